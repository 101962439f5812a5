"""Parallel setup: validate TP/PP/EP/ETP/CP/VPP sizes, init torch.distributed and megatron parallel_state.

DP is what remains: ``world = tp * cp * pp * dp`` for dense layers, and the expert layers regroup the
same ranks as ``world = etp * ep * pp * expert_dp``. On CPU the backend is gloo and ``cpu.py``'s shims
are installed; on GPU it is nccl.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_spo.megatron.cpu import apply_cpu_shims


@dataclass(frozen=True)
class ParallelSizes:
    """Model-parallel sizes; ``dp`` is derived from the world size.

    Attributes:
        tp: tensor parallel. pp: pipeline parallel. ep: expert parallel.
        etp: expert tensor parallel (None = same as tp, megatron's default).
        cp: context parallel (GPU only). vpp: virtual pipeline stages per rank (None = off; interleaved
            1F1B schedule, tested on CPU too).
        sequence_parallel: shard activations along the sequence in TP regions (GPU only, needs TE/apex
            norms; MoE with tp > 1 requires it during training).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    cp: int = 1
    vpp: Optional[int] = None
    sequence_parallel: bool = False

    @classmethod
    def from_config(cls, parallel: Any) -> "ParallelSizes":
        """From ``megatron_spo.config.ParallelConfig`` (fields tensor, pipeline, expert, ...)."""
        return cls(tp=parallel.tensor, pp=parallel.pipeline, ep=parallel.expert, etp=parallel.expert_tensor,
                   cp=parallel.context, vpp=parallel.virtual_pipeline,
                   sequence_parallel=parallel.sequence_parallel)


_CURRENT: Optional[ParallelSizes] = None


def current_parallel_sizes() -> Optional[ParallelSizes]:
    """The sizes of the last ``initialize_parallel`` in this process (None before / after teardown)."""
    return _CURRENT


def _hf_get(hf_config: Any, key: str, default: Any = None) -> Any:
    if isinstance(hf_config, dict):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def validate_parallel_sizes(sizes: ParallelSizes, world_size: int, hf_config: Any = None) -> int:
    """Check ``sizes`` against ``world_size`` and the model; return the data-parallel size.

    Raises:
        ValueError: naming the offending size and value (e.g. ``tp=3 does not divide
            num_attention_heads=4``).
    """
    for name in ("tp", "pp", "ep", "cp"):
        value = getattr(sizes, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"parallel size {name}={value!r} must be a positive integer")
    etp = sizes.tp if sizes.etp is None else sizes.etp
    if etp < 1:
        raise ValueError(f"parallel size etp={sizes.etp!r} must be a positive integer")
    if sizes.vpp is not None and (sizes.vpp < 1 or sizes.pp == 1):
        raise ValueError(f"vpp={sizes.vpp!r} needs pp > 1 (pp={sizes.pp}) and must be >= 1")
    dense = sizes.tp * sizes.cp * sizes.pp
    if world_size % dense:
        raise ValueError(f"world_size={world_size} is not divisible by tp*cp*pp={sizes.tp}*{sizes.cp}*{sizes.pp}")
    expert = etp * sizes.ep * sizes.pp
    if world_size % expert:
        raise ValueError(f"world_size={world_size} is not divisible by etp*ep*pp={etp}*{sizes.ep}*{sizes.pp}")
    if hf_config is not None:
        heads = _hf_get(hf_config, "num_attention_heads")
        kv = _hf_get(hf_config, "num_key_value_heads") or heads
        layers = _hf_get(hf_config, "num_hidden_layers")
        experts = _hf_get(hf_config, "num_experts") or _hf_get(hf_config, "num_local_experts")
        if heads % sizes.tp:
            raise ValueError(f"tp={sizes.tp} does not divide num_attention_heads={heads}")
        if kv % sizes.tp:
            raise ValueError(f"tp={sizes.tp} does not divide num_key_value_heads={kv} (KV groups)")
        stages = sizes.pp * (sizes.vpp or 1)
        if layers % stages:
            raise ValueError(f"pp*vpp={sizes.pp}*{sizes.vpp or 1} does not divide num_hidden_layers={layers}")
        if experts:
            if experts % sizes.ep:
                raise ValueError(f"ep={sizes.ep} does not divide num_experts={experts}")
        elif sizes.ep > 1:
            raise ValueError(f"ep={sizes.ep} but the model has no experts (dense architecture)")
    return world_size // dense


def _init_process_group() -> None:
    """Initialise torch.distributed from env (torchrun / launch.py) or as a single process."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:  # a single process without a launcher
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = "0", "1", "0"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_parallel(sizes: ParallelSizes = ParallelSizes(), *, hf_config: Any = None, seed: int = 1234) -> int:
    """Set up torch.distributed, megatron ``parallel_state`` and the model-parallel RNG.

    Args:
        sizes: the parallel sizes; validated against the world size and ``hf_config``.
        hf_config: HF config (object or dict) whose heads/KV groups/layers/experts must divide.
        seed: base seed; megatron derives distinct TP/EP/PP streams from it.

    Returns:
        the data-parallel size.
    """
    if not torch.cuda.is_available():
        for feature, on in (("sequence_parallel", sizes.sequence_parallel), ("cp>1", sizes.cp > 1)):
            if on:
                raise ValueError(f"{feature} is GPU-only (no CUDA here); see docs/megatron_on_cpu.md")
    apply_cpu_shims()
    _init_process_group()
    dp = validate_parallel_sizes(sizes, dist.get_world_size(), hf_config)
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        virtual_pipeline_model_parallel_size=sizes.vpp,
        context_parallel_size=sizes.cp,
        expert_model_parallel_size=sizes.ep,
        expert_tensor_parallel_size=sizes.etp,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    global _CURRENT
    _CURRENT = sizes
    return dp


def teardown_parallel(destroy_process_group: bool = True) -> None:
    """Destroy megatron parallel state (and the torch.distributed group unless told otherwise)."""
    from megatron.core import parallel_state

    global _CURRENT
    _CURRENT = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
