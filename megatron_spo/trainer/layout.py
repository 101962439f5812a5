"""The parallel layout against the world size and the model's HF config, checked before anything is built.

Pure Python (config.json is read with :mod:`json`; no torch, no megatron-core), so ``megatron-spo
preflight`` and the trainer's start (``trainer/setup.py``, before torch.distributed and megatron's
parallel state) both run it. A layout that cannot run fails here in one line that names the
``parallel.*`` key and the model field, instead of tens of seconds later as a traceback on every rank.

Only layouts that fail later anyway are refused:

- world size: divisible by TP x PP x CP (the dense grid) and by ETP x EP x PP (the expert grid;
  megatron-core folds CP into the expert data-parallel group);
- TP divides ``num_attention_heads``, ``num_key_value_heads`` (megatron-core could replicate KV heads
  when TP is a multiple of them, but this project's weight sharding gives every rank whole KV heads,
  and ``megatron/parallel.py`` refuses it too), ``vocab_size`` (vocab-parallel embedding rows) and,
  when some layer has a dense MLP, ``intermediate_size``;
- ETP (TP when ``parallel.expert_tensor`` is null) divides ``moe_intermediate_size``;
- PP x VPP divides ``num_hidden_layers`` (every stage gets the same number of layers);
- EP divides ``num_experts``, and EP > 1 needs a model with experts;
- without CUDA: no ``sequence_parallel``, ``context`` > 1 or ``distributed_optimizer`` (GPU-only).

``parallel.sequence_parallel`` without TP > 1, VPP without PP > 1 and MoE with TP > 1 without
sequence parallel are config errors already (``megatron_spo.config``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from megatron_spo.config import Config, ConfigError

MOE_ARCHITECTURE = "Qwen3MoeForCausalLM"


class LayoutError(ConfigError):
    """The ``parallel`` section cannot run this model on this world size; the message names key and field."""


def _expert_tensor(parallel: Any) -> Tuple[int, str]:
    """(ETP, how to name it): ``parallel.expert_tensor`` falls back to ``parallel.tensor`` when null."""
    if parallel.expert_tensor is None:
        return parallel.tensor, f"parallel.tensor={parallel.tensor} (parallel.expert_tensor is null)"
    return parallel.expert_tensor, f"parallel.expert_tensor={parallel.expert_tensor}"


def dense_grid_problem(parallel: Any, world_size: int) -> Optional[str]:
    """Why ``world_size`` ranks cannot hold TP x PP x CP model replicas, or None."""
    p = parallel
    size = p.tensor * p.pipeline * p.context
    if world_size % size == 0:
        return None
    return (f"world size {world_size} is not divisible by TP*PP*CP = {size} (parallel.tensor={p.tensor} x "
            f"parallel.pipeline={p.pipeline} x parallel.context={p.context})")


def expert_grid_problem(parallel: Any, world_size: int) -> Optional[str]:
    """Why ``world_size`` ranks cannot be regrouped as ETP x EP x PP for the expert layers, or None."""
    etp, etp_name = _expert_tensor(parallel)
    size = etp * parallel.expert * parallel.pipeline
    if world_size % size == 0:
        return None
    return (f"world size {world_size} is not divisible by ETP*EP*PP = {size} ({etp_name} x "
            f"parallel.expert={parallel.expert} x parallel.pipeline={parallel.pipeline})")


def device_problems(parallel: Any, cuda_available: bool) -> List[str]:
    """The GPU-only features ``parallel`` turns on, when there is no CUDA."""
    if cuda_available:
        return []
    gpu_only = (("parallel.sequence_parallel=true", parallel.sequence_parallel),
                (f"parallel.context={parallel.context}", parallel.context > 1),
                ("parallel.distributed_optimizer=true", parallel.distributed_optimizer))
    return [f"{what} needs CUDA and none is visible (see docs/megatron_on_cpu.md)" for what, on in gpu_only if on]


def _is_moe(hf: Mapping[str, Any]) -> bool:
    """The Qwen3-MoE family, chosen as ``megatron/model.py`` does: ``architectures`` first, then ``model_type``."""
    architectures = hf.get("architectures") or []
    if architectures:
        return architectures[0] == MOE_ARCHITECTURE
    return hf.get("model_type") == "qwen3_moe"


def _mlp_kinds(hf: Mapping[str, Any]) -> Tuple[bool, bool]:
    """(some layer has a dense MLP, some layer has experts); Qwen3-MoE layer i is sparse iff i is not in
    ``mlp_only_layers`` and (i + 1) % ``decoder_sparse_step`` == 0."""
    if not _is_moe(hf):
        return True, False
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    sparse = [i not in dense and (i + 1) % step == 0 for i in range(int(hf.get("num_hidden_layers") or 0))]
    return not all(sparse), any(sparse)


def _divides(key: str, size: int, field: str, why: str, hf: Mapping[str, Any], source: str) -> Optional[str]:
    value = hf.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value % size == 0:
        return None  # an absent field is the model builder's error, not a layout one
    return f"{key} does not divide the model's {field}={value} ({source}){why}"


def model_problems(parallel: Any, hf: Mapping[str, Any], source: str) -> List[str]:
    """Every way ``parallel`` does not fit the model whose HF config is ``hf`` (read from ``source``)."""
    p = parallel
    hf = dict(hf)
    if not hf.get("num_key_value_heads"):
        hf["num_key_value_heads"] = hf.get("num_attention_heads")  # no field: plain multi-head attention
    tp_key = f"parallel.tensor={p.tensor}"
    dense_mlp, sparse_mlp = _mlp_kinds(hf)
    checks = [(tp_key, p.tensor, "num_attention_heads", ""),
              (tp_key, p.tensor, "num_key_value_heads", "; every tensor-parallel rank needs whole KV heads"),
              (tp_key, p.tensor, "vocab_size", "; the embedding is split by vocabulary rows")]
    if dense_mlp:
        checks.append((tp_key, p.tensor, "intermediate_size", ""))
    if sparse_mlp:
        etp, etp_name = _expert_tensor(p)
        checks.append((etp_name, etp, "moe_intermediate_size", ""))
    stages = p.pipeline * (p.virtual_pipeline or 1)
    stage_key = (f"parallel.pipeline={p.pipeline} x parallel.virtual_pipeline={p.virtual_pipeline} = {stages}"
                 if p.virtual_pipeline else f"parallel.pipeline={p.pipeline}")
    checks.append((stage_key, stages, "num_hidden_layers", ""))
    experts_field = "num_experts" if hf.get("num_experts") else "num_local_experts"
    if hf.get(experts_field):
        checks.append((f"parallel.expert={p.expert}", p.expert, experts_field, ""))
    out = [problem for problem in (_divides(*check, hf, source) for check in checks) if problem]
    if p.expert > 1 and not hf.get(experts_field):
        out.append(f"parallel.expert={p.expert} > 1 but the model has no experts (no num_experts in {source})")
    return out


def read_model_config(model_path: str) -> Tuple[Dict[str, Any], str]:
    """(the HF config of ``model.path`` as a dict, the path it was read from, for messages).

    Raises:
        LayoutError: ``model.path`` is unset, or has no readable config.json.
    """
    if not model_path:
        raise LayoutError("model.path is not set; the parallel layout is checked against its config.json")
    path = Path(model_path)
    if not path.exists():
        raise LayoutError(f"model.path={model_path} does not exist")
    source = path / "config.json" if path.is_dir() else path
    try:
        with open(source) as fh:
            hf = json.load(fh)
    except FileNotFoundError:
        raise LayoutError(f"model.path={model_path} has no HF config.json") from None
    except (OSError, ValueError) as err:
        raise LayoutError(f"model.path={model_path}: cannot read {source}: {err}") from None
    if not isinstance(hf, dict):
        raise LayoutError(f"model.path={model_path}: {source} is not a JSON object")
    return hf, str(source)


def check_layout(cfg: Config, *, cuda_available: bool, world_size: Optional[int] = None) -> None:
    """Refuse a layout that cannot run, before torch.distributed or megatron-core are touched.

    Args:
        cfg: the run's config (``parallel`` and ``model.path`` are read).
        cuda_available: whether this process sees CUDA (GPU-only features are refused without it).
        world_size: the number of ranks; default ``$WORLD_SIZE`` (set by torchrun), else 1.

    Raises:
        LayoutError: one line listing every problem, each naming its ``parallel.*`` key (and the model field).
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    p = cfg.parallel
    problems = device_problems(p, cuda_available)
    problems += [m for m in (dense_grid_problem(p, world_size), expert_grid_problem(p, world_size)) if m]
    try:
        hf, source = read_model_config(cfg.model.path)
    except LayoutError as err:  # reported with the problems found so far
        problems.append(str(err))
    else:
        problems += model_problems(p, hf, source)
    if problems:
        raise LayoutError("; ".join(problems))
