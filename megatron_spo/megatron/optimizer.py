"""Megatron DDP + Megatron optimizer + OptimizerParamScheduler for the actor.

Gradient reduction: the actor divides every micro-batch loss by the *global* normaliser (summed over
micro-batches and DP ranks before the backward passes), so DP gradients must be **summed**, not
averaged. That is megatron's ``calculate_per_token_loss=True`` mode (DDP gradient scaling factor 1,
no division by the number of micro-batches in the schedules); ``finalize_model_grads`` is called
without a token count so it does not rescale again.

Clipping: ``clip_grad`` > 0 clips by the global grad norm megatron computes over all model-parallel
and DP groups. On CPU megatron's scaling step asserts CUDA tensors; ``cpu.py`` replaces only that
step (same formula), so clipping is on on both devices.

Distributed optimizer: used when asked for and CUDA is present; on CPU it raises (megatron's
distributed optimizer refuses CPU tensors, docs/megatron_on_cpu.md §7). CPU offload of Adam and bf16
Adam moments run on top of it (megatron's precision-aware path), so they are GPU-only too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch


@dataclass
class OptimSettings:
    """Optimizer and LR schedule; field names follow ``megatron_spo.config.OptimConfig``.

    ``lr_schedule``: constant | linear | cosine, decaying from ``lr`` to ``min_lr`` over
    ``total_steps`` after ``warmup_steps`` of linear warm-up from 0.
    """

    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    distributed_optimizer: bool = False
    optimizer: str = "adam"  # or "sgd" (plain SGD: makes the effect of clipping visible in tests)
    cpu_offload: bool = False  # Adam state and update on the CPU (HybridDeviceOptimizer); GPU only
    offload_fraction: float = 1.0  # with cpu_offload: share of parameters updated on the CPU
    moments_dtype: str = "float32"  # or "bfloat16": precision-aware optimizer (TE FusedAdam); GPU only

    @classmethod
    def from_config(cls, optim: Any, total_steps: int, distributed_optimizer: bool = False) -> "OptimSettings":
        return cls(lr=optim.lr, min_lr=optim.min_lr, lr_schedule=optim.lr_schedule,
                   warmup_steps=optim.warmup_steps, total_steps=total_steps, weight_decay=optim.weight_decay,
                   adam_beta1=getattr(optim, "adam_beta1", 0.9), adam_beta2=getattr(optim, "adam_beta2", 0.999),
                   adam_eps=optim.adam_eps, clip_grad=optim.clip_grad, distributed_optimizer=distributed_optimizer,
                   cpu_offload=getattr(optim, "cpu_offload", False),
                   offload_fraction=getattr(optim, "offload_fraction", 1.0),
                   moments_dtype=getattr(optim, "moments_dtype", "float32"))


def wrap_ddp(chunks: List[torch.nn.Module], distributed_optimizer: bool = False) -> List[torch.nn.Module]:
    """Wrap each model chunk in megatron's ``DistributedDataParallel`` (fp32 grad buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if distributed_optimizer and not torch.cuda.is_available():
        raise ValueError("distributed_optimizer=True needs CUDA (megatron's distributed optimizer refuses CPU tensors)")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed_optimizer)
    wrapped = []
    for i, chunk in enumerate(chunks):
        if not chunk.config.calculate_per_token_loss:
            raise ValueError("model config must have calculate_per_token_loss=True (grads are summed over DP)")
        # Chunks after the first skip their bucket sync during the first chunk's backward (megatron's rule).
        wrapped.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                               disable_bucketing=i > 0))
    return wrapped


def optimizer_config_kwargs(settings: OptimSettings, params_dtype: torch.dtype) -> Dict[str, Any]:
    """megatron ``OptimizerConfig`` fields for ``settings``.

    CPU offload and bf16 moments both run through megatron's precision-aware optimizer path (megatron
    requires it for the HybridDeviceOptimizer), which in turn needs the distributed optimizer.
    """
    if settings.moments_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"moments_dtype={settings.moments_dtype!r}; choose 'float32' or 'bfloat16'")
    if not 0.0 < settings.offload_fraction <= 1.0:
        raise ValueError(f"offload_fraction={settings.offload_fraction} must be in (0, 1]")
    precision_aware = settings.cpu_offload or settings.moments_dtype != "float32"
    if precision_aware and not (settings.distributed_optimizer and settings.optimizer == "adam"):
        raise ValueError("cpu_offload and bfloat16 moments need the distributed optimizer with adam")
    moments = torch.bfloat16 if settings.moments_dtype == "bfloat16" else torch.float32
    return dict(
        optimizer=settings.optimizer, lr=settings.lr, sgd_momentum=0.0, min_lr=settings.min_lr,
        weight_decay=settings.weight_decay, adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps, clip_grad=settings.clip_grad, bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype, use_distributed_optimizer=settings.distributed_optimizer,
        use_precision_aware_optimizer=precision_aware, exp_avg_dtype=moments, exp_avg_sq_dtype=moments,
        optimizer_cpu_offload=settings.cpu_offload,
        optimizer_offload_fraction=settings.offload_fraction if settings.cpu_offload else 0.0,
        # Overlap the device<->host copies of the offloaded state with the update (what verl/slime run).
        overlap_cpu_optimizer_d2h_h2d=settings.cpu_offload,
    )


def build_optimizer(chunks: List[torch.nn.Module], settings: OptimSettings) -> Tuple[Any, Any]:
    """``(optimizer, scheduler)`` for DDP-wrapped chunks: Adam(W) (or SGD) via ``get_megatron_optimizer``."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    styles = {"constant": "constant", "linear": "linear", "cosine": "cosine"}
    if settings.optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer={settings.optimizer!r}; choose 'adam' or 'sgd'")
    if settings.lr_schedule not in styles:
        raise ValueError(f"lr_schedule={settings.lr_schedule!r}; choose from {sorted(styles)}")
    if settings.warmup_steps < 0 or settings.total_steps < 1:
        raise ValueError(f"warmup_steps={settings.warmup_steps} must be >= 0 and total_steps={settings.total_steps} >= 1")
    config = OptimizerConfig(**optimizer_config_kwargs(settings, chunks[0].config.params_dtype))
    optimizer = get_megatron_optimizer(config, chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if settings.warmup_steps else settings.lr, max_lr=settings.lr,
        min_lr=settings.min_lr, lr_warmup_steps=settings.warmup_steps,
        lr_decay_steps=max(settings.total_steps, settings.warmup_steps + 1), lr_decay_style=styles[settings.lr_schedule],
        start_wd=settings.weight_decay, end_wd=settings.weight_decay, wd_incr_steps=settings.total_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
