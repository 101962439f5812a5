"""Loss aggregation modes, shared input checks of the policy losses, and metric reduction.

Every policy loss builds a per-token loss matrix ``L [B, T]`` and hands it to :func:`aggregate`,
which returns ``(loss_sum, normaliser)`` instead of a mean. The caller sums both over all
micro-batches (and data-parallel ranks) of an optimizer step and divides once, so the loss and its
gradient do not depend on how the batch was split::

    loss = Σ_micro loss_sum / Σ_micro,ranks normaliser

Modes (``m`` is the 0/1 response mask; tool-output and padding tokens have m = 0):

=============================  ==========================================  ===========================
mode                           loss_sum                                    normaliser
=============================  ==========================================  ===========================
``token-mean``                 Σ_i Σ_t m·L                                 Σ_i Σ_t m (valid tokens)
``seq-mean-token-mean``        Σ_i (Σ_t m·L / Σ_t m)                       #rows with ≥ 1 valid token
``seq-mean-token-sum-norm``    Σ_i Σ_t m·L / max_len   (Dr. GRPO)          #rows with ≥ 1 valid token
=============================  ==========================================  ===========================

Choices and deviations (docs/algorithms.md §1.6, §4):
- verl's seq modes average over **all** B rows. Here rows without any valid token are left out of
  both the sum and the count, so padding rows added to fill a micro-batch never change the loss.
  For real data (every response has ≥ 1 model token) the two agree.
- ``seq-mean-token-sum-norm`` needs ``max_len`` (verl uses the configured max response length); it is
  never inferred from T, because T is the padded width of *this* micro-batch and would make the
  loss depend on the split.
- The normaliser is returned in the loss's float dtype (at least float32) with no grad. Per
  micro-batch counts are exact in float32 (< 2^24 tokens); callers summing many micro-batches
  should accumulate in float64.

Metric convention (:class:`~megatron_spo.algos.types.LossOutput`): a metric ``name`` is a detached
**sum** with a companion ``name/count``; its value is ``sum / count`` after both are summed over
micro-batches and ranks. Keys ending in ``_max`` are maxima, reduced with ``max`` and never
divided. :func:`reduce_metrics` and :func:`finalize_metrics` implement exactly that.
"""

from __future__ import annotations

from typing import Dict, Iterable, NamedTuple, Optional, Tuple

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

_COUNT_SUFFIX = "/count"
_MAX_SUFFIX = "_max"


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    """At least float32: sums over many tokens in bf16/fp16 lose integer precision past 256/2048."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def check_agg_mode(mode: str, max_len: Optional[int] = None) -> None:
    """Raise ``ValueError`` for an unknown mode or a missing / invalid ``max_len``."""
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; allowed: {list(AGG_MODES)}")
    if mode == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError(
                "aggregation mode 'seq-mean-token-sum-norm' needs max_len (the max response length, "
                "a constant of the run); got max_len=None"
            )
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")


def aggregate(
    loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, max_len: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reduce a per-token matrix to ``(loss_sum, normaliser)`` (see the module table).

    Args:
        loss_mat: ``[B, T]`` float, per-token values (may carry grad).
        mask: ``[B, T]`` bool or 0/1 float, valid tokens.
        mode: one of :data:`AGG_MODES`.
        max_len: the constant divisor of ``seq-mean-token-sum-norm`` (tokens); ignored otherwise.

    Returns:
        ``loss_sum``: 0-d tensor with the grad of ``loss_mat``; ``normaliser``: 0-d tensor, no grad.
        Entries outside the mask never reach the result, even if they are NaN or Inf.
    """
    check_agg_mode(mode, max_len)
    if loss_mat.dim() != 2 or mask.shape != loss_mat.shape:
        raise ValueError(
            f"aggregate: loss_mat must be [B, T] and mask the same shape; got loss_mat "
            f"{tuple(loss_mat.shape)}, mask {tuple(mask.shape)}"
        )
    dtype = _float_dtype(loss_mat)
    valid = mask.bool()
    # where(), not multiplication: 0 * NaN would leak garbage from padded positions.
    masked = torch.where(valid, loss_mat.to(dtype), torch.zeros((), dtype=dtype, device=loss_mat.device))
    if mode == "token-mean":
        return masked.sum(), valid.sum().to(dtype)
    tokens_per_row = valid.sum(dim=-1).to(dtype)  # [B]
    rows = (tokens_per_row > 0).sum().to(dtype)
    row_sums = masked.sum(dim=-1)  # [B]
    if mode == "seq-mean-token-mean":
        return (row_sums / tokens_per_row.clamp_min(1.0)).sum(), rows
    # seq-mean-token-sum-norm
    return row_sums.sum() / float(max_len), rows


class LossInputs(NamedTuple):
    """Validated, sanitised inputs of a policy loss (all ``[B, T]``).

    ``logp`` keeps its grad; everything else is detached. Entries outside the mask are replaced by
    0 in every tensor so that padding garbage (NaN, ±Inf) cannot reach values or gradients.
    """

    logp: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    valid: torch.Tensor  # bool
    rollout_logp: Optional[torch.Tensor]


def check_loss_inputs(
    fn_name: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    rollout_logp: Optional[torch.Tensor] = None,
    names: Tuple[str, str, str] = ("logp", "old_logp", "advantages"),
) -> LossInputs:
    """Validate the common policy-loss arguments and return them sanitised.

    Errors (``ValueError``, message starts with ``fn_name``):
        - ``logp`` not 2-D, or any other argument's shape differs from ``logp``'s (names both);
        - empty batch (B = 0 or T = 0) or a mask without any valid token;
        - mask values other than 0/1;
        - NaN or ±Inf in ``logp``, ``old_logp``, ``advantages`` or ``rollout_logp`` at a valid
          token (names the argument and the first bad ``[row, col]``).
    Policy: non-finite values at masked positions (padding) are allowed and ignored.
    ``names`` renames the first three arguments in messages (e.g. ``ref_logp`` for a KL term).
    """
    n_logp, n_old, n_adv = names
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2:
        shape = tuple(logp.shape) if isinstance(logp, torch.Tensor) else type(logp).__name__
        raise ValueError(f"{fn_name}: {n_logp} must be a [B, T] tensor, got shape {shape}")
    named = {n_old: old_logp, n_adv: advantages, "mask": mask}
    if rollout_logp is not None:
        named["rollout_logp"] = rollout_logp
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn_name}: {name} must be a tensor, got {type(t).__name__}")
        if t.shape != logp.shape:
            raise ValueError(
                f"{fn_name}: {name} has shape {tuple(t.shape)} but {n_logp} has shape {tuple(logp.shape)}"
            )
    if logp.numel() == 0:
        raise ValueError(f"{fn_name}: empty batch ({n_logp} shape {tuple(logp.shape)})")
    if mask.dtype != torch.bool:
        if ((mask != 0) & (mask != 1)).any():
            bad = ((mask != 0) & (mask != 1)).nonzero()[0].tolist()
            raise ValueError(f"{fn_name}: mask must be 0/1, found {mask[tuple(bad)].item()} at {bad}")
    valid = mask.bool().detach()
    if not valid.any():
        raise ValueError(f"{fn_name}: mask has no valid token (all zero) in a batch of shape {tuple(logp.shape)}")
    tensors = {n_logp: logp, n_old: old_logp, n_adv: advantages}
    if rollout_logp is not None:
        tensors["rollout_logp"] = rollout_logp
    for name, t in tensors.items():
        bad = valid & ~torch.isfinite(t.detach())
        if bad.any():
            where = bad.nonzero()[0].tolist()
            raise ValueError(
                f"{fn_name}: {name} has a non-finite value {t[tuple(where)].item()} at valid token {where}"
            )

    def clean(t: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))

    return LossInputs(
        logp=clean(logp),
        old_logp=clean(old_logp.detach()),
        advantages=clean(advantages.detach()),
        valid=valid,
        rollout_logp=None if rollout_logp is None else clean(rollout_logp.detach()),
    )


def token_metric(values: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Detached ``(Σ over valid tokens, #valid tokens)`` of a ``[B, T]`` per-token metric."""
    s, n = aggregate(values.detach(), valid, "token-mean")
    return s.detach(), n


def seq_metric(values: torch.Tensor, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Detached ``(Σ over selected rows, #rows)`` of a ``[B]`` per-sequence metric; ``rows`` is bool [B]."""
    dtype = _float_dtype(values)
    v = torch.where(rows, values.detach().to(dtype), torch.zeros((), dtype=dtype, device=values.device))
    return v.sum(), rows.sum().to(dtype)


def add_mean_metric(metrics: Dict[str, torch.Tensor], name: str, pair: Tuple[torch.Tensor, torch.Tensor]) -> None:
    """Store a ``(sum, count)`` pair as ``metrics[name]`` and ``metrics[name + '/count']``."""
    metrics[name] = pair[0].detach()
    metrics[name + _COUNT_SUFFIX] = pair[1].detach()


def reduce_metrics(parts: Iterable[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Combine metric dicts of several micro-batches: sums and counts add, ``*_max`` keys take the max.

    For data-parallel ranks do the same with ``all_reduce`` (SUM for everything except ``*_max``,
    which needs MAX).
    """
    out: Dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in part.items():
            value = value.detach()
            if key not in out:
                out[key] = value.clone()
            elif key.endswith(_MAX_SUFFIX):
                out[key] = torch.maximum(out[key], value)
            else:
                out[key] = out[key] + value
    return out


def finalize_metrics(metrics: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Turn reduced sums into means: ``name → sum / count`` where ``name/count`` exists.

    Keys without a count (``*_max`` and plain totals) are returned as they are; count keys are
    dropped. A zero count gives NaN, which says "no sample" rather than a fake 0.
    """
    out: Dict[str, float] = {}
    for key, value in metrics.items():
        if key.endswith(_COUNT_SUFFIX):
            continue
        count = metrics.get(key + _COUNT_SUFFIX)
        if count is None:
            out[key] = float(value)
        else:
            c = float(count)
            out[key] = float(value) / c if c > 0 else float("nan")
    return out
