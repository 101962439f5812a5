"""One typed configuration tree for a run: model, parallel, rollout, algo, optim, data, train, io.

Loaded from YAML, overridden with dotted ``key=value`` pairs (``--set algo.spo.rho_min=0.9``),
validated with errors that name the key and the allowed values, printed, and saved as YAML and
JSON in the run directory. Field types are enforced from the annotations (``Literal`` fields list
their allowed values); range and cross-field rules live in each section's ``check`` method.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "layernorm", "moe_act", "shared_experts")


@dataclass
class ModelConfig:
    path: str = ""
    """HF model directory (config.json + safetensors + tokenizer) to start from."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the trainer; float32 on CPU."""
    max_seq_len: int = 4096
    """Longest prompt + response the trainer accepts (must not exceed the model's max positions)."""
    moe_aux_loss_coef: float = 0.0
    """Router load-balancing loss coefficient; 0 (off) by default for RL, as it skews log-probs."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recompute in the backward pass, trading compute for activation memory: 'full' keeps only
    the inputs of whole transformer layers and re-runs them, 'selective' re-runs only recompute_modules."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """With recompute=full: 'uniform' makes every recompute_num_layers layers one recompute unit; 'block'
    recomputes only the first recompute_num_layers layers of each pipeline stage."""
    recompute_num_layers: int = 1
    recompute_modules: List[str] = field(default_factory=lambda: ["core_attn"])
    """With recompute=selective: any of core_attn, mlp, moe, layernorm, moe_act, shared_experts."""

    def check(self, key: str) -> None:
        _positive(f"{key}.max_seq_len", self.max_seq_len)
        _at_least(f"{key}.moe_aux_loss_coef", self.moe_aux_loss_coef, 0.0)
        _positive(f"{key}.recompute_num_layers", self.recompute_num_layers)
        unknown = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
        if unknown:
            raise ConfigError(f"{key}.recompute_modules: unknown {unknown}; choose from {list(RECOMPUTE_MODULES)}")
        if self.recompute == "selective" and not self.recompute_modules:
            raise ConfigError(f"{key}.recompute=selective needs at least one of {key}.recompute_modules")


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    expert: int = 1
    expert_tensor: Optional[int] = None
    context: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False

    def check(self, key: str) -> None:
        for name in ("tensor", "pipeline", "expert", "context"):
            _positive(f"{key}.{name}", getattr(self, name))
        for name in ("virtual_pipeline", "expert_tensor"):
            if getattr(self, name) is not None:
                _positive(f"{key}.{name}", getattr(self, name))
        if self.virtual_pipeline is not None and self.pipeline == 1:
            raise ConfigError(f"{key}.virtual_pipeline needs {key}.pipeline > 1, got pipeline=1")
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError(f"{key}.sequence_parallel needs {key}.tensor > 1, got tensor=1")


@dataclass
class RolloutConfig:
    engine: Literal["embedded", "sglang", "vllm"] = "embedded"
    """Which engine serves rollouts: the in-process CPU engine, or SGLang / vLLM servers."""
    urls: List[str] = field(default_factory=list)
    """Server URLs started elsewhere (e.g. by slurm/rollout.sbatch); empty with engine=embedded."""
    ray_servers: int = 0
    """If > 0, Ray places and supervises this many servers instead of using ``urls``."""
    agent: Literal["single_turn", "spo_code", "hermes"] = "single_turn"
    """Rollout protocol: plain single turn, the SPO <code> tool protocol, or Hermes tool calls."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_response_len: int = 8192
    """Token budget of the whole (multi-turn) response, model and tool tokens together."""
    max_assistant_turns: int = 8
    max_user_turns: int = 8
    tool_response_max_chars: int = 256
    sandbox_url: str = "http://127.0.0.1:8080"
    max_concurrency: int = 64
    """Generations in flight at once across the fleet."""
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_top_k: int = 20
    eval_samples: int = 16
    """Samples per problem in validation (avg@k, maj@k, pass@k)."""
    max_staleness: int = 0
    """Samples generated with weights more than this many versions old are regenerated."""
    request_timeout_s: float = 600.0

    def check(self, key: str) -> None:
        _in_range(f"{key}.temperature", self.temperature, 0.0, None, low_open=True)
        _in_range(f"{key}.top_p", self.top_p, 0.0, 1.0, low_open=True)
        _in_range(f"{key}.eval_temperature", self.eval_temperature, 0.0, None, low_open=True)
        _in_range(f"{key}.eval_top_p", self.eval_top_p, 0.0, 1.0, low_open=True)
        for name in ("eval_samples", "max_response_len", "max_assistant_turns", "max_user_turns",
                     "tool_response_max_chars", "max_concurrency"):
            _positive(f"{key}.{name}", getattr(self, name))
        _at_least(f"{key}.max_staleness", self.max_staleness, 0)
        _in_range(f"{key}.request_timeout_s", self.request_timeout_s, 0.0, None, low_open=True)
        if self.engine == "embedded" and (self.urls or self.ray_servers):
            raise ConfigError(f"{key}.engine=embedded takes no {key}.urls or {key}.ray_servers")
        if self.engine != "embedded" and not self.urls and self.ray_servers == 0:
            raise ConfigError(f"{key}.engine={self.engine} needs {key}.urls or {key}.ray_servers > 0")


@dataclass
class SPOConfig:
    offline_values: Optional[str] = None
    """JSON file {prompt_key: [scores]} from `megatron-spo estimate-values`; None = uninformative prior."""
    offline_n: int = 8
    """Scores per prompt used for the prior (0: alpha = beta = 0.5)."""
    rho_type: Literal["kl", "constant"] = "kl"
    rho_mode: Literal["exact", "accumulated"] = "exact"
    """exact: re-score the last stored response (the reference); accumulated: drift ledger, no extra pass."""
    rho_min: float = 0.875
    rho_max: float = 0.96
    rho_constant: float = 0.875
    d_half: float = 0.06
    sampling_eps: float = 0.05
    thompson: bool = False
    """Draw v ~ Beta(alpha, beta) for the sampling weight (a deviation; the reference uses the mean)."""
    pool_size: int = 14000
    """Candidate pool drawn from the dataset each step; the prioritized sampler picks from it."""

    def check(self, key: str) -> None:
        _at_least(f"{key}.offline_n", self.offline_n, 0)
        _in_range(f"{key}.rho_min", self.rho_min, 0.0, 1.0, low_open=True)
        _in_range(f"{key}.rho_max", self.rho_max, 0.0, 1.0, low_open=True)
        _in_range(f"{key}.rho_constant", self.rho_constant, 0.0, 1.0, low_open=True)
        if self.rho_min > self.rho_max:
            raise ConfigError(f"{key}.rho_min ({self.rho_min}) must not exceed {key}.rho_max ({self.rho_max})")
        _in_range(f"{key}.d_half", self.d_half, 0.0, None, low_open=True)
        _at_least(f"{key}.sampling_eps", self.sampling_eps, 0.0)
        _positive(f"{key}.pool_size", self.pool_size)


@dataclass
class GRPOConfig:
    n: int = 8
    """Responses per prompt."""
    norm_by_std: bool = True

    def check(self, key: str) -> None:
        _positive(f"{key}.n", self.n)


@dataclass
class SegmentConfig:
    prob_threshold: float = 0.9
    cutpoint_interval: int = 5
    mc_rollouts: int = 9

    def check(self, key: str) -> None:
        _in_range(f"{key}.prob_threshold", self.prob_threshold, 0.0, 1.0, low_open=True)
        _positive(f"{key}.cutpoint_interval", self.cutpoint_interval)
        _positive(f"{key}.mc_rollouts", self.mc_rollouts)


@dataclass
class LossConfig:
    name: Literal["ppo", "gspo", "vespo"] = "ppo"
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: Optional[float] = 10.0
    """Dual-clip cap c for negative advantages (None disables it)."""
    gspo_clip_low: float = 3e-4
    gspo_clip_high: float = 4e-4
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    tis_cap: Optional[float] = None
    """Truncated importance-sampling cap C for engine/trainer mismatch (None: off)."""
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k3"] = "k3"
    entropy_coef: float = 0.0

    def check(self, key: str) -> None:
        for name in ("clip_low", "clip_high", "gspo_clip_low", "gspo_clip_high"):
            _in_range(f"{key}.{name}", getattr(self, name), 0.0, 1.0, low_open=True)
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ConfigError(f"{key}.dual_clip must be > 1 (or null to disable), got {self.dual_clip}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _in_range(f"{key}.{name}", getattr(self, name), 0.0, None, low_open=True)
        if self.tis_cap is not None and self.tis_cap < 1.0:
            raise ConfigError(f"{key}.tis_cap must be >= 1 (or null to disable), got {self.tis_cap}")
        _at_least(f"{key}.kl_coef", self.kl_coef, 0.0)
        _at_least(f"{key}.entropy_coef", self.entropy_coef, 0.0)

    def loss_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of the registered loss ``name`` (see megatron_spo/algos/losses.py, vespo.py)."""
        if self.name == "ppo":
            return dict(clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip, tis_cap=self.tis_cap)
        if self.name == "gspo":
            return dict(clip_low=self.gspo_clip_low, clip_high=self.gspo_clip_high, tis_cap=self.tis_cap)
        return dict(k_pos=self.vespo_k_pos, lambda_pos=self.vespo_lambda_pos, k_neg=self.vespo_k_neg,
                    lambda_neg=self.vespo_lambda_neg, tis_cap=self.tis_cap)


@dataclass
class AlgoConfig:
    advantage: Literal["spo", "grpo", "dr_grpo", "rloo"] = "spo"
    """Advantage estimator; spo uses the per-prompt value tracker and one response per prompt."""
    spo: SPOConfig = field(default_factory=SPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def check(self, key: str) -> None:
        pass


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global grad-norm clip (0 disables)."""
    cpu_offload: bool = False
    """Keep Adam's state on the CPU and run its update there (megatron's HybridDeviceOptimizer). GPU only;
    needs parallel.distributed_optimizer."""
    offload_fraction: float = 1.0
    """With cpu_offload: the share of parameters whose optimizer step runs on the CPU."""
    moments_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of Adam's two moments. bfloat16 (megatron's precision-aware optimizer) stores 8 instead of 12
    bytes of optimizer state per parameter. GPU only: needs parallel.distributed_optimizer and Transformer
    Engine's FusedAdam."""

    def check(self, key: str) -> None:
        _in_range(f"{key}.lr", self.lr, 0.0, None, low_open=True)
        _at_least(f"{key}.min_lr", self.min_lr, 0.0)
        if self.min_lr > self.lr:
            raise ConfigError(f"{key}.min_lr ({self.min_lr}) must not exceed {key}.lr ({self.lr})")
        _at_least(f"{key}.warmup_steps", self.warmup_steps, 0)
        _at_least(f"{key}.weight_decay", self.weight_decay, 0.0)
        _in_range(f"{key}.adam_beta1", self.adam_beta1, 0.0, 1.0, high_open=True)
        _in_range(f"{key}.adam_beta2", self.adam_beta2, 0.0, 1.0, high_open=True)
        _in_range(f"{key}.adam_eps", self.adam_eps, 0.0, None, low_open=True)
        _at_least(f"{key}.clip_grad", self.clip_grad, 0.0)
        _in_range(f"{key}.offload_fraction", self.offload_fraction, 0.0, 1.0, low_open=True)


@dataclass
class DataConfig:
    train_path: str = ""
    """Prompt dataset: a parquet / jsonl / json file or an HF `save_to_disk` directory."""
    eval_paths: List[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    reward: str = "spo_strict_boxed"
    """Reward function: a registered name (spo_strict_boxed, math_verify, ...) or 'package.module:function'."""
    max_prompt_len: int = 2048
    """Prompts longer than this many tokens are an error naming the row (or skipped, see skip_bad_rows)."""
    skip_bad_rows: bool = False
    """Count and log bad rows instead of stopping at the first one."""

    def check(self, key: str) -> None:
        _positive(f"{key}.max_prompt_len", self.max_prompt_len)
        if not self.prompt_key:
            raise ConfigError(f"{key}.prompt_key must not be empty")


@dataclass
class TrainConfig:
    steps: int = 500
    prompts_per_step: int = 768
    """Prompts sampled per step (responses per step = this x responses per prompt)."""
    updates_per_step: int = 8
    """Optimizer steps (mini-batches) per rollout batch."""
    micro_batch_tokens: int = 16384
    """Token budget of one micro-batch (dynamic batch size)."""
    seed: int = 1
    eval_every: int = 10
    save_every: int = 20

    def check(self, key: str) -> None:
        for name in ("steps", "prompts_per_step", "updates_per_step", "micro_batch_tokens"):
            _positive(f"{key}.{name}", getattr(self, name))
        _at_least(f"{key}.eval_every", self.eval_every, 0)
        _at_least(f"{key}.save_every", self.save_every, 0)


@dataclass
class IOConfig:
    run_dir: str = "runs/default"
    resume: str = "auto"
    """'auto' (latest complete checkpoint in run_dir, if any), 'none', or a checkpoint path."""
    keep_last: int = 3
    tensorboard: bool = True
    wandb: bool = False
    log_every: int = 1

    def check(self, key: str) -> None:
        if not self.run_dir:
            raise ConfigError(f"{key}.run_dir must not be empty")
        _positive(f"{key}.keep_last", self.keep_last)
        _positive(f"{key}.log_every", self.log_every)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    io: IOConfig = field(default_factory=IOConfig)

    def check(self, key: str) -> None:
        if self.parallel.sequence_parallel is False and self.parallel.tensor > 1 and self.parallel.expert > 1:
            # megatron-core refuses MoE with TP > 1 during training unless sequence parallel is on.
            raise ConfigError("parallel.tensor > 1 with parallel.expert > 1 needs parallel.sequence_parallel=true")
        for name, on in (("optim.cpu_offload", self.optim.cpu_offload),
                         ("optim.moments_dtype=bfloat16", self.optim.moments_dtype != "float32")):
            if on and not self.parallel.distributed_optimizer:
                # megatron runs both through the distributed optimizer's precision-aware path.
                raise ConfigError(f"{name} needs parallel.distributed_optimizer=true")

    # -----------------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, run_dir: Union[str, Path]) -> Tuple[Path, Path]:
        """Write ``config.yaml`` and ``config.json`` into ``run_dir`` (created); returns both paths."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        yaml_path, json_path = run_dir / "config.yaml", run_dir / "config.json"
        yaml_path.write_text(self.to_yaml())
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return yaml_path, json_path


# ---------------------------------------------------------------------------------------------
# Loading, overrides and type enforcement
# ---------------------------------------------------------------------------------------------


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """Build a validated :class:`Config` from an optional YAML file and dotted ``key=value`` overrides.

    Override values are parsed as YAML scalars/lists (``0.9``, ``true``, ``null``, ``[a, b]``).

    Raises:
        ConfigError: unreadable file, unknown key, wrong type, or a value out of range.
    """
    data: Dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        data = loaded
    for item in overrides:
        _apply_override(data, item)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Run every section's range and cross-field checks (types were enforced while building)."""

    def walk(obj: Any, key: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                walk(value, f"{key}.{f.name}" if key else f.name)
        obj.check(key or "config")

    walk(cfg, "")


def _apply_override(data: Dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: Any, key: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key or 'config'} must be a mapping of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for name in data:
        if name not in known:
            where = f"{key}.{name}" if key else str(name)
            close = difflib.get_close_matches(str(name), list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {where!r}{hint}")
    kwargs = {}
    for name, f in known.items():
        if name in data:
            where = f"{key}.{name}" if key else name
            kwargs[name] = _coerce(data[name], hints[name], where)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int -> float where harmless)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None:
            if len(non_none) != len(args):
                return None
            raise ConfigError(f"{key} must not be null")
        return _coerce(value, non_none[0], key)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads `1e-6` (no dot in the mantissa) as a string; accept numeric text.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")  # a bug in this file


# ---------------------------------------------------------------------------------------------
# Range helpers (error messages name the key and the allowed range)
# ---------------------------------------------------------------------------------------------


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value!r}")


def _in_range(key: str, value: float, low: Optional[float], high: Optional[float],
              low_open: bool = False, high_open: bool = False) -> None:
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{key} must be in {interval}, got {value!r}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, List):
        return f"list[{_type_name(args[0])}]"
    return "null" if tp is type(None) else tp.__name__


def describe() -> str:
    """Every config key with its type and default, for ``megatron-spo config keys``."""
    lines: List[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in fields(cls):
            tp = hints[f.name]
            if is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            shown = _type_name(tp)
            lines.append(f"{prefix}{f.name}: {shown} = {getattr(defaults, f.name)!r}")

    walk(Config, "")
    return "\n".join(lines)

