"""Start-up of a training run: parallel state, the Megatron actor, the algorithm family, the rollout side.

:func:`setup` returns the :class:`Run`, everything the loop touches; layout checks run before the model
is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
import torch.distributed as dist

from megatron_spo.config import Config, ConfigError
from megatron_spo.data import PromptDataset
from megatron_spo.trainer.algorithm import AlgorithmStep
from megatron_spo.trainer.metrics_log import MetricsLogger
from megatron_spo.trainer.prompt_stream import PromptStream
from megatron_spo.trainer.registry import algorithm_class, build_algorithm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from megatron_spo.megatron.actor import MegatronActor
    from megatron_spo.megatron.reference import ReferencePolicy
    from megatron_spo.rollout.engine import Engine
    from megatron_spo.rollout.phase import RolloutPhase
    from megatron_spo.trainer.validation import Validator


@dataclass
class Run:
    """Everything the loop touches. ``engine``, ``phase``, ``validator`` and ``logger`` live on rank 0 only.

    Attributes:
        algorithm: the family chosen by ``algo.advantage`` (draw, advantages, after-update, state).
        stream: the shuffled dataset positions the family draws from (its state is checkpointed).
        reference: the frozen initial policy scoring ``ref_logp`` for the KL penalty (None when
            ``algo.loss.kl_coef`` is 0).
        step: steps completed; weight_version: optimizer steps the engines' weights reflect (one
            per training step); metrics: this step's metrics, filled as the step runs.
    """

    cfg: Config
    actor: "MegatronActor"
    dataset: PromptDataset
    tokenizer: "PreTrainedTokenizerBase"
    stream: PromptStream
    algorithm: AlgorithmStep
    logger: Optional[MetricsLogger] = None
    reference: Optional["ReferencePolicy"] = None
    engine: Optional["Engine"] = None
    phase: Optional["RolloutPhase"] = None
    validator: Optional["Validator"] = None
    step: int = 0
    weight_version: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0


def setup(cfg: Config) -> Run:
    """Load and check the data (every row, prompt lengths included), build the actor (after the layout
    checks), build the family; rank 0 also builds the engine, the rollout phase and the validator."""
    from megatron_spo.rollout.prompt_length import load_train_prompts

    # every row validated, its prompt length included, before anything is built; with data.skip_bad_rows
    # the skipped rows are not in ``dataset``, so they never enter the sampling pool
    dataset, tokenizer = load_train_prompts(cfg)
    actor = build_actor(cfg)
    reference = build_reference(cfg)
    rank = dist.get_rank()
    if rank == 0:
        cfg.save(cfg.io.run_dir)
        print(cfg.to_yaml(), flush=True)
    stream = PromptStream(len(dataset), seed=cfg.train.seed)
    run = Run(cfg=cfg, actor=actor, dataset=dataset, tokenizer=tokenizer, stream=stream,
              algorithm=build_algorithm(cfg, dataset, stream), reference=reference)
    if rank == 0:
        from megatron_spo.rollout.build import build_engine, context_len
        from megatron_spo.rollout.phase import RolloutPhase

        run.engine = build_engine(cfg)
        run.phase = RolloutPhase(run.engine, tokenizer, cfg.rollout, reward=cfg.data.reward,
                                 max_prompt_len=cfg.data.max_prompt_len, skip_bad_rows=cfg.data.skip_bad_rows,
                                 context_len=context_len(run.engine), seed=cfg.train.seed)
        if cfg.data.eval_paths and cfg.train.eval_every:
            from megatron_spo.trainer.validation import Validator

            run.validator = Validator(cfg, run.engine, tokenizer, context_len(run.engine))
    return run


def samples_per_step(cfg: Config) -> int:
    """Responses per step: prompts x the family's responses per prompt (1 for SPO, the group size for GRPO)."""
    return cfg.train.prompts_per_step * algorithm_class(cfg).samples_per_prompt(cfg)


def check_run_config(cfg: Config, dp: int) -> None:
    """Cross-checks that need the world layout, then the family's own; errors name the keys."""
    if not cfg.model.path or not cfg.data.train_path:
        raise ConfigError("model.path and data.train_path must be set to train")
    n = samples_per_step(cfg)
    if n % dp:
        raise ConfigError(f"samples per step ({n}: train.prompts_per_step x responses per prompt) must be divisible "
                          f"by the data-parallel size {dp}")
    if cfg.train.updates_per_step > n // dp:
        raise ConfigError(f"train.updates_per_step={cfg.train.updates_per_step} exceeds the {n // dp} samples per "
                          "data-parallel rank")
    algorithm_class(cfg).check_config(cfg)


def build_actor(cfg: Config):
    """Initialise torch.distributed + megatron parallel state, check the layout, build the actor
    (model chunks, DDP, optimizer, LR schedule, policy loss) and load ``model.path``'s HF weights."""
    from megatron_spo.megatron.actor import LossSettings, MegatronActor
    from megatron_spo.megatron.export import load_hf_weights
    from megatron_spo.megatron.model import load_hf_config
    from megatron_spo.megatron.optimizer import OptimSettings
    from megatron_spo.megatron.parallel import ParallelSizes, initialize_parallel
    from megatron_spo.trainer.layout import check_layout

    if not cfg.model.path:
        raise ConfigError("model.path must be set to train")
    p, loss = cfg.parallel, cfg.algo.loss
    check_layout(cfg, cuda_available=torch.cuda.is_available())  # before torch.distributed and megatron
    dp = initialize_parallel(ParallelSizes(tp=p.tensor, pp=p.pipeline, ep=p.expert, etp=p.expert_tensor, cp=p.context,
                                           vpp=p.virtual_pipeline, sequence_parallel=p.sequence_parallel),
                             hf_config=load_hf_config(cfg.model.path), seed=cfg.train.seed)
    check_run_config(cfg, dp)
    actor = MegatronActor(
        cfg.model.path,
        optim=OptimSettings.from_config(cfg.optim, cfg.train.steps * cfg.train.updates_per_step,
                                        distributed_optimizer=p.distributed_optimizer),
        loss=LossSettings(name=loss.name, agg=loss.agg, max_len=cfg.rollout.max_response_len,
                          kwargs=loss.loss_kwargs(), kl_coef=loss.kl_coef, kl_estimator=loss.kl_estimator,
                          entropy_coef=loss.entropy_coef),
        packing=cfg.train.packing, **actor_layout_kwargs(cfg))
    load_hf_weights(actor.model, cfg.model.path)
    if torch.distributed.get_rank() == 0:
        print(actor.summary(), flush=True)
    return actor


def actor_layout_kwargs(cfg: Config) -> Dict[str, Any]:
    """The actor's keyword arguments that fix its layout and log-probs (shared with the reference)."""
    from megatron_spo.megatron.model import recompute_overrides

    return dict(micro_batch_tokens=cfg.train.micro_batch_tokens, temperature=cfg.rollout.temperature,
                params_dtype=torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32,
                aux_loss_coef=cfg.model.moe_aux_loss_coef,
                **recompute_overrides(cfg.model.recompute, cfg.model.recompute_method, cfg.model.recompute_num_layers,
                                      cfg.model.recompute_modules))


def build_reference(cfg: Config) -> Optional["ReferencePolicy"]:
    """The KL penalty's frozen reference (the initial weights of ``model.path``, the actor's layout),
    or None without a penalty; call after :func:`build_actor` (the parallel state is up)."""
    if cfg.algo.loss.kl_coef <= 0:
        return None
    from megatron_spo.megatron.reference import ReferencePolicy

    reference = ReferencePolicy(cfg.model.path, **actor_layout_kwargs(cfg))
    if dist.get_rank() == 0:
        print(f"reference policy (KL penalty): {reference.parameters_on_rank():,} frozen parameters on this rank",
              flush=True)
    return reference
