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
distributed optimizer refuses CPU tensors, see notes/megatron_on_cpu.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Tuple

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

    @classmethod
    def from_config(cls, optim: Any, total_steps: int, distributed_optimizer: bool = False) -> "OptimSettings":
        return cls(lr=optim.lr, min_lr=optim.min_lr, lr_schedule=optim.lr_schedule,
                   warmup_steps=optim.warmup_steps, total_steps=total_steps, weight_decay=optim.weight_decay,
                   adam_beta1=getattr(optim, "adam_beta1", 0.9), adam_beta2=getattr(optim, "adam_beta2", 0.999),
                   adam_eps=optim.adam_eps, clip_grad=optim.clip_grad, distributed_optimizer=distributed_optimizer)


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
    params_dtype = chunks[0].config.params_dtype
    config = OptimizerConfig(
        optimizer=settings.optimizer, lr=settings.lr, sgd_momentum=0.0, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad, bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        use_distributed_optimizer=settings.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if settings.warmup_steps else settings.lr, max_lr=settings.lr,
        min_lr=settings.min_lr, lr_warmup_steps=settings.warmup_steps,
        lr_decay_steps=max(settings.total_steps, settings.warmup_steps + 1), lr_decay_style=styles[settings.lr_schedule],
        start_wd=settings.weight_decay, end_wd=settings.weight_decay, wd_incr_steps=settings.total_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
