"""Start-up of a training run: parallel state, the Megatron actor with its weights, layout checks."""

from __future__ import annotations

import torch

from megatron_spo.config import Config, ConfigError


def samples_per_step(cfg: Config) -> int:
    """Responses per step: prompts x 1 for SPO, prompts x group size for the group estimators."""
    return cfg.train.prompts_per_step * (1 if cfg.algo.advantage == "spo" else cfg.algo.grpo.n)


def check_run_config(cfg: Config, dp: int) -> None:
    """Cross-checks that need the world layout; errors name the keys."""
    if not cfg.model.path or not cfg.data.train_path:
        raise ConfigError("model.path and data.train_path must be set to train")
    n = samples_per_step(cfg)
    if n % dp:
        raise ConfigError(f"samples per step ({n}: train.prompts_per_step x responses per prompt) must be divisible "
                          f"by the data-parallel size {dp}")
    if cfg.train.updates_per_step > n // dp:
        raise ConfigError(f"train.updates_per_step={cfg.train.updates_per_step} exceeds the {n // dp} samples per "
                          "data-parallel rank")
    if cfg.algo.advantage == "spo" and cfg.algo.spo.rho_mode == "accumulated" and cfg.train.updates_per_step < 2:
        raise ConfigError("algo.spo.rho_mode=accumulated needs train.updates_per_step >= 2")


def build_actor(cfg: Config):
    """Initialise torch.distributed + megatron parallel state, check the layout, build the actor
    (model chunks, DDP, optimizer, LR schedule, policy loss) and load ``model.path``'s HF weights."""
    from megatron_spo.megatron.actor import LossSettings, MegatronActor
    from megatron_spo.megatron.export import load_hf_weights
    from megatron_spo.megatron.model import load_hf_config, recompute_overrides
    from megatron_spo.megatron.optimizer import OptimSettings
    from megatron_spo.megatron.parallel import ParallelSizes, initialize_parallel

    if not cfg.model.path:
        raise ConfigError("model.path must be set to train")
    p, loss = cfg.parallel, cfg.algo.loss
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
        micro_batch_tokens=cfg.train.micro_batch_tokens, temperature=cfg.rollout.temperature,
        params_dtype=torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32,
        aux_loss_coef=cfg.model.moe_aux_loss_coef,
        **recompute_overrides(cfg.model.recompute, cfg.model.recompute_method, cfg.model.recompute_num_layers,
                              cfg.model.recompute_modules))
    load_hf_weights(actor.model, cfg.model.path)
    if torch.distributed.get_rank() == 0:
        print(actor.summary(), flush=True)
    return actor
