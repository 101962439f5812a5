"""The typed configuration tree of a run: model, parallel, rollout, algo, optim, data, train, io.

Every key is declared with :func:`~megatron_spo.config.declare.key`: its default and a one-line
description. Field types are enforced from the annotations while loading (``Literal`` fields list
their allowed values); range and cross-field rules of one section live in its ``check`` method
(``key`` is the section's dotted name, for the messages); rules across sections in ``checks.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from megatron_spo.config.algo_schema import AlgoConfig
from megatron_spo.config.declare import key
from megatron_spo.config.errors import ConfigError, at_least, in_range, positive
from megatron_spo.config.yaml_io import dump_yaml, write_yaml_and_json

RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "layernorm", "moe_act", "shared_experts")


@dataclass
class ModelConfig:
    """``model``: the starting checkpoint and how the trainer holds it."""

    path: str = key("", "HF model directory (config.json + safetensors + tokenizer) to start from")
    dtype: Literal["float32", "bfloat16"] = key("float32", "parameter dtype of the trainer; float32 on CPU")
    max_seq_len: int = key(4096, "cap on the embedded engine's context window (prompt + response tokens)")
    moe_aux_loss_coef: float = key(0.0, "MoE router load-balancing loss weight; 0 (off) for RL, as it skews log-probs")
    # 'full' keeps only the inputs of whole transformer layers and re-runs them in the backward pass;
    # 'selective' re-runs only recompute_modules: compute traded for activation memory.
    recompute: Literal["none", "full", "selective"] = key("none", "activation recompute in the backward pass")
    # 'uniform' makes every recompute_num_layers layers one recompute unit; 'block' recomputes only the
    # first recompute_num_layers layers of each pipeline stage.
    recompute_method: Literal["uniform", "block"] = key("uniform", "with recompute=full: uniform units or block")
    recompute_num_layers: int = key(1, "with recompute=full: layers per recompute unit (uniform) or per stage (block)")
    recompute_modules: List[str] = key(
        ["core_attn"], "with recompute=selective: any of core_attn, mlp, moe, layernorm, moe_act, shared_experts")

    def check(self, key: str) -> None:
        positive(f"{key}.max_seq_len", self.max_seq_len)
        at_least(f"{key}.moe_aux_loss_coef", self.moe_aux_loss_coef, 0.0)
        positive(f"{key}.recompute_num_layers", self.recompute_num_layers)
        unknown = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
        if unknown:
            raise ConfigError(f"{key}.recompute_modules: unknown {unknown}; choose from {list(RECOMPUTE_MODULES)}")
        if self.recompute == "selective" and not self.recompute_modules:
            raise ConfigError(f"{key}.recompute=selective needs at least one of {key}.recompute_modules")


@dataclass
class ParallelConfig:
    """``parallel``: the trainer's model-parallel layout; data parallelism is what remains of the world."""

    tensor: int = key(1, "tensor-parallel size (TP)")
    pipeline: int = key(1, "pipeline-parallel size (PP)")
    virtual_pipeline: Optional[int] = key(None, "model chunks per pipeline stage (interleaved schedule; needs PP > 1)")
    expert: int = key(1, "expert-parallel size (EP) of MoE layers")
    expert_tensor: Optional[int] = key(None, "tensor-parallel size inside the experts (ETP); null: the same as tensor")
    context: int = key(1, "context-parallel size (CP): the sequence split across ranks; GPU only")
    sequence_parallel: bool = key(False, "shard activations along the sequence within the TP group (needs TP > 1)")
    distributed_optimizer: bool = key(False, "shard the optimizer state across data-parallel ranks; GPU only")

    def check(self, key: str) -> None:
        for name in ("tensor", "pipeline", "expert", "context"):
            positive(f"{key}.{name}", getattr(self, name))
        for name in ("virtual_pipeline", "expert_tensor"):
            if getattr(self, name) is not None:
                positive(f"{key}.{name}", getattr(self, name))
        if self.virtual_pipeline is not None and self.pipeline == 1:
            raise ConfigError(f"{key}.virtual_pipeline needs {key}.pipeline > 1, got pipeline=1")
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError(f"{key}.sequence_parallel needs {key}.tensor > 1, got tensor=1")


@dataclass
class RolloutConfig:
    """``rollout``: the engine that generates, the agent protocol, sampling and limits."""

    engine: Literal["embedded", "sglang", "vllm"] = key(
        "embedded", "what serves rollouts: the in-process CPU engine, or SGLang / vLLM servers")
    urls: List[str] = key([], "server URLs started elsewhere (e.g. by slurm/rollout.sbatch); empty with embedded")
    ray_servers: int = key(0, "if > 0, Ray places and supervises this many servers instead of using urls")
    agent: Literal["single_turn", "spo_code", "hermes"] = key(
        "single_turn", "rollout protocol: plain single turn, the SPO <code> tool protocol, or Hermes tool calls")
    temperature: float = key(1.0, "training sampling temperature (the trainer's log-probs use it too)")
    top_p: float = key(1.0, "training nucleus sampling threshold (1: off)")
    top_k: int = key(-1, "training top-k sampling (-1: off)")
    max_response_len: int = key(8192, "token budget of the whole (multi-turn) response, model and tool tokens together")
    max_assistant_turns: int = key(8, "the response ends after this many assistant turns")
    max_user_turns: int = key(8, "the response ends after this many tool (user) turns")
    tool_response_max_chars: int = key(256, "tool outputs longer than this many characters are cut in the middle")
    sandbox_url: str = key("http://127.0.0.1:8080", "SandboxFusion-compatible server that runs the tool calls")
    max_concurrency: int = key(64, "generations in flight at once across the fleet")
    eval_temperature: float = key(0.6, "validation / evaluate sampling temperature")
    eval_top_p: float = key(0.95, "validation / evaluate nucleus sampling threshold")
    eval_top_k: int = key(20, "validation / evaluate top-k sampling (<= 0: off)")
    eval_samples: int = key(16, "samples per problem in validation (avg@k, maj@k, pass@k)")
    request_timeout_s: float = key(600.0, "seconds one generate request may take before it is an error")

    def check(self, key: str) -> None:
        in_range(f"{key}.temperature", self.temperature, 0.0, None, low_open=True)
        in_range(f"{key}.top_p", self.top_p, 0.0, 1.0, low_open=True)
        in_range(f"{key}.eval_temperature", self.eval_temperature, 0.0, None, low_open=True)
        in_range(f"{key}.eval_top_p", self.eval_top_p, 0.0, 1.0, low_open=True)
        for name in ("eval_samples", "max_response_len", "max_assistant_turns", "max_user_turns",
                     "tool_response_max_chars", "max_concurrency"):
            positive(f"{key}.{name}", getattr(self, name))
        in_range(f"{key}.request_timeout_s", self.request_timeout_s, 0.0, None, low_open=True)
        if self.engine == "embedded" and (self.urls or self.ray_servers):
            raise ConfigError(f"{key}.engine=embedded takes no {key}.urls or {key}.ray_servers")
        if self.engine != "embedded" and not self.urls and self.ray_servers == 0:
            raise ConfigError(f"{key}.engine={self.engine} needs {key}.urls or {key}.ray_servers > 0")


@dataclass
class OptimConfig:
    """``optim``: Adam, the LR schedule, gradient clipping and where the optimizer state lives."""

    lr: float = key(1e-6, "peak learning rate")
    min_lr: float = key(0.0, "learning rate at the end of the linear / cosine decay")
    lr_schedule: Literal["constant", "linear", "cosine"] = key("constant", "decay after warmup, over all updates")
    warmup_steps: int = key(0, "optimizer steps of linear warmup from 0 to lr")
    weight_decay: float = key(0.0, "weight decay of the optimizer")
    adam_beta1: float = key(0.9, "Adam beta1")
    adam_beta2: float = key(0.999, "Adam beta2")
    adam_eps: float = key(1e-8, "Adam epsilon")
    clip_grad: float = key(1.0, "global grad-norm clip (0 disables)")
    # megatron's HybridDeviceOptimizer.
    cpu_offload: bool = key(False, "keep Adam's state on the CPU and run its update there; GPU only")
    offload_fraction: float = key(1.0, "with cpu_offload: the share of parameters whose optimizer step runs on the CPU")
    # megatron's precision-aware optimizer; needs Transformer Engine's FusedAdam.
    moments_dtype: Literal["float32", "bfloat16"] = key(
        "float32", "dtype of Adam's two moments; bfloat16 stores 8 instead of 12 bytes per parameter; GPU only")

    def check(self, key: str) -> None:
        in_range(f"{key}.lr", self.lr, 0.0, None, low_open=True)
        at_least(f"{key}.min_lr", self.min_lr, 0.0)
        if self.min_lr > self.lr:
            raise ConfigError(f"{key}.min_lr ({self.min_lr}) must not exceed {key}.lr ({self.lr})")
        at_least(f"{key}.warmup_steps", self.warmup_steps, 0)
        at_least(f"{key}.weight_decay", self.weight_decay, 0.0)
        in_range(f"{key}.adam_beta1", self.adam_beta1, 0.0, 1.0, high_open=True)
        in_range(f"{key}.adam_beta2", self.adam_beta2, 0.0, 1.0, high_open=True)
        in_range(f"{key}.adam_eps", self.adam_eps, 0.0, None, low_open=True)
        at_least(f"{key}.clip_grad", self.clip_grad, 0.0)
        in_range(f"{key}.offload_fraction", self.offload_fraction, 0.0, 1.0, low_open=True)


@dataclass
class DataConfig:
    """``data``: the prompt datasets, their columns and the reward."""

    train_path: str = key("", "prompt dataset: a parquet / jsonl / json file or an HF `save_to_disk` directory")
    eval_paths: List[str] = key([], "validation datasets, one benchmark each (same formats as train_path)")
    prompt_key: str = key("prompt", "dataset column holding the prompt")
    answer_key: str = key("answer", "dataset column holding the reference answer given to the reward")
    reward: str = key(
        "spo_strict_boxed", "reward function: a registered name (spo_strict_boxed, math_verify, ...) or 'pkg.mod:fn'")
    max_prompt_len: int = key(2048, "a longer prompt (in tokens) is an error naming the row, or skipped (skip_bad_rows)")
    skip_bad_rows: bool = key(False, "count and log bad rows instead of stopping at the first one")

    def check(self, key: str) -> None:
        positive(f"{key}.max_prompt_len", self.max_prompt_len)
        if not self.prompt_key:
            raise ConfigError(f"{key}.prompt_key must not be empty")


@dataclass
class TrainConfig:
    """``train``: the length and shape of the run."""

    steps: int = key(500, "training steps, each one rollout batch")
    prompts_per_step: int = key(768, "prompts sampled per step (responses per step = this x responses per prompt)")
    updates_per_step: int = key(8, "optimizer steps (mini-batches) per rollout batch")
    micro_batch_tokens: int = key(16384, "token budget of one micro-batch (dynamic batch size)")
    packing: bool = key(False, "pack sequences padding-free into micro-batch rows (block-diagonal attention / THD)")
    seed: int = key(1, "seed of the prompt order, samplers, offline prior, megatron RNGs and the embedded engine")
    eval_every: int = key(10, "validate on data.eval_paths every this many steps (0: never)")
    save_every: int = key(20, "checkpoint every this many steps (0: only at the end and on preemption)")

    def check(self, key: str) -> None:
        for name in ("steps", "prompts_per_step", "updates_per_step", "micro_batch_tokens"):
            positive(f"{key}.{name}", getattr(self, name))
        at_least(f"{key}.eval_every", self.eval_every, 0)
        at_least(f"{key}.save_every", self.save_every, 0)


@dataclass
class IOConfig:
    """``io``: the run directory, checkpoints and metric logging."""

    run_dir: str = key("runs/default", "run directory: config, checkpoints, metrics.jsonl, tensorboard")
    resume: str = key("auto", "'auto' (latest complete checkpoint in run_dir, if any), 'none', or a checkpoint path")
    keep_last: int = key(3, "complete checkpoints kept in run_dir; older ones are deleted")
    tensorboard: bool = key(True, "also write metrics as tensorboard events")
    wandb: bool = key(False, "also log metrics to Weights & Biases (project megatron_spo)")
    log_every: int = key(1, "log metrics every this many steps")

    def check(self, key: str) -> None:
        if not self.run_dir:
            raise ConfigError(f"{key}.run_dir must not be empty")
        positive(f"{key}.keep_last", self.keep_last)
        positive(f"{key}.log_every", self.log_every)


@dataclass
class Config:
    """The whole tree; build it with :func:`megatron_spo.config.load_config`, which also validates it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    io: IOConfig = field(default_factory=IOConfig)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def save(self, run_dir: Union[str, Path]) -> Tuple[Path, Path]:
        """Write ``config.yaml`` and ``config.json`` into ``run_dir`` (created); returns both paths."""
        return write_yaml_and_json(self.to_dict(), Path(run_dir), "config")
