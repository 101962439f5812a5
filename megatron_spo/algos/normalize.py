"""Masked, optionally cross-rank, mean / variance and the normalisations built on them.

Moments are computed from three sums (Σx, Σx², n) so that data-parallel ranks can all-reduce
those sums and every rank then normalises with the same global statistics. ``reduce_fn`` receives
a float64 tensor ``[3]`` and must return the elementwise sum over ranks (for example
``lambda t: (dist.all_reduce(t, group=dp_group), t)[1]``); ``None`` means single process.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

ReduceFn = Optional[Callable[[torch.Tensor], torch.Tensor]]


def masked_moments(
    x: torch.Tensor, mask: Optional[torch.Tensor] = None, *, unbiased: bool = True, reduce_fn: ReduceFn = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and variance of ``x`` over the entries where ``mask`` is true, across ranks.

    Args:
        x: any shape, float.
        mask: same shape as ``x`` (bool or 0/1), or None for all entries.
        unbiased: Bessel's correction (divide by n − 1), as ``torch.std`` does by default.
        reduce_fn: sums the ``[3]`` tensor (Σx, Σx², n) over data-parallel ranks.

    Returns:
        (mean, var, count) as 0-d float64 tensors. ``var`` is 0 when count ≤ 1 (unbiased) or 0.

    Raises:
        ValueError: shapes differ, or no entry is selected on any rank.
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    if mask.shape != x.shape:
        raise ValueError(f"masked_moments: mask shape {tuple(mask.shape)} != values shape {tuple(x.shape)}")
    m = mask.to(torch.float64)
    xd = x.detach().to(torch.float64)
    sums = torch.stack([(xd * m).sum(), (xd * xd * m).sum(), m.sum()])
    if reduce_fn is not None:
        sums = reduce_fn(sums)
    total, total_sq, count = sums[0], sums[1], sums[2]
    if count <= 0:
        raise ValueError("masked_moments: no valid entries (empty batch or all-zero mask)")
    mean = total / count
    # Σ(x−μ)² = Σx² − nμ²; clamp tiny negative round-off.
    sq_dev = (total_sq - count * mean * mean).clamp_min(0.0)
    denom = count - 1 if unbiased else count
    var = sq_dev / denom if denom > 0 else torch.zeros((), dtype=torch.float64)
    return mean, var, count


def normalize_std_eps(
    x: torch.Tensor, mask: Optional[torch.Tensor] = None, *, eps: float = 1e-8, reduce_fn: ReduceFn = None
) -> torch.Tensor:
    """``(x − mean) / (std + eps)`` with the unbiased std, statistics over the masked entries.

    The SPO and GRPO form. Entries outside the mask are returned as 0. Same shape and dtype as ``x``.
    """
    mean, var, _ = masked_moments(x, mask, unbiased=True, reduce_fn=reduce_fn)
    out = (x.to(torch.float64) - mean) / (var.sqrt() + eps)
    if mask is not None:
        out = out * mask.to(out.dtype)
    return out.to(x.dtype)


def whiten(
    x: torch.Tensor, mask: Optional[torch.Tensor] = None, *, eps: float = 1e-8, reduce_fn: ReduceFn = None
) -> torch.Tensor:
    """``(x − mean) / sqrt(var + eps)`` with the unbiased variance over the masked entries.

    The SegPO (treetune ``masked_whiten``) form. Entries outside the mask are returned as 0.
    """
    mean, var, _ = masked_moments(x, mask, unbiased=True, reduce_fn=reduce_fn)
    out = (x.to(torch.float64) - mean) / torch.sqrt(var + eps)
    if mask is not None:
        out = out * mask.to(out.dtype)
    return out.to(x.dtype)
