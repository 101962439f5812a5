"""SPO advantages: r − v̂ with the tracker's baseline, normalised over the whole batch (docs/algorithms.md §1.5).

Deviations from the reference (verl-recipe ``spo/spo_ray_trainer.py``, block after the reward) and choices:

1. **A batch of one response** (globally, after the cross-rank reduction) has no std. The reference's
   ``torch.std`` returns NaN there and the NaN reaches the loss. Here the centred advantage a − mean(a) is
   exactly 0 for a single response, the std term is 0, so the advantage is 0: that response carries no
   learning signal this step (and no NaN). Likewise a batch whose advantages are all equal gets ≈ 0.
2. **Cross-rank statistics.** With data parallelism each rank holds part of the step's batch;
   ``reduce_fn`` sums (Σa, Σa², n) over ranks (``normalize.normalize_std_eps``), so every rank uses the
   global mean and unbiased std, which equals the reference's single-process computation on the whole
   batch.
3. Inputs are checked: rewards and baseline must be finite, the baseline must be in [0, 1] (it is a
   probability; anything else means a wrong tensor was passed), shapes must agree, the batch must not be
   empty. Each failure is a ``ValueError`` naming the row and value.

**Order of calls (the caller's job):** ``baseline`` must be the tracker's v̂ read **before** this step's
tracker update (``ValueTracker.values(keys)`` right after the rewards are known); the update that uses the
post-update ρ comes at the end of the step (docs/algorithms.md §1.9, steps 4 and 8).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_spo.algos.normalize import ReduceFn, normalize_std_eps
from megatron_spo.algos.registry import register_advantage


def _check_vector(x: torch.Tensor, name: str, batch: Optional[int]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"spo_advantages: {name} must be a torch.Tensor [B], got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"spo_advantages: {name} must be 1-D [B], got shape {tuple(x.shape)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"spo_advantages: {name} has {x.shape[0]} rows, rewards has {batch}")
    if x.numel() == 0:
        raise ValueError(f"spo_advantages: {name} is empty (B = 0)")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"spo_advantages: {name} must be real numbers, got dtype {x.dtype}")
    bad = (~torch.isfinite(x.to(torch.float64))).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"spo_advantages: {name}[{i}] = {x[i].item()} is not finite")


@register_advantage("spo")
def spo_advantages(
    rewards: torch.Tensor,
    baseline: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    reduce_fn: ReduceFn = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """SPO token advantages ``A[i, t] = (a_i − mean(a)) / (std(a) + eps) · m[i, t]`` with ``a = r − v̂``.

    Args:
        rewards: ``[B]`` scalar reward per response (one response per prompt).
        baseline: ``[B]`` v̂ of each response's prompt from the tracker **before** this step's update.
        response_mask: ``[B, T]`` bool or 0/1, 1 on the model's own response tokens (tool output is 0).
        reduce_fn: sums a float64 ``[3]`` tensor over data-parallel ranks (None: this process only).
        eps: added to the unbiased std (1e-8 in the reference).

    Returns:
        ``[B, T]`` token advantages, 0 where the mask is 0; dtype of ``rewards`` if floating, else float32.
        The mean and std are over the B responses (of all ranks), not over tokens.
    """
    _check_vector(rewards, "rewards", None)
    b = rewards.shape[0]
    _check_vector(baseline, "baseline", b)
    bad = ((baseline < 0) | (baseline > 1)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"spo_advantages: baseline[{i}] = {baseline[i].item()} is not a probability in [0, 1]")
    if not isinstance(response_mask, torch.Tensor) or response_mask.dim() != 2 or response_mask.shape[0] != b:
        shape = tuple(response_mask.shape) if isinstance(response_mask, torch.Tensor) else type(response_mask).__name__
        raise ValueError(f"spo_advantages: response_mask must be [B, T] with B = {b}, got {shape}")
    if response_mask.dtype != torch.bool:
        bad = ((response_mask != 0) & (response_mask != 1)).nonzero()
        if bad.numel():
            i, t = (int(v) for v in bad[0])
            raise ValueError(f"spo_advantages: response_mask[{i}, {t}] = {response_mask[i, t].item()} is not 0/1")
    if not (eps > 0.0 and eps < float("inf")):  # eps = 0 would turn a zero std into 0/0 = NaN
        raise ValueError(f"spo_advantages: eps must be a finite number > 0, got {eps}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    raw = rewards.detach().to(torch.float64) - baseline.detach().to(torch.float64)
    adv = normalize_std_eps(raw, eps=eps, reduce_fn=reduce_fn)
    return (adv[:, None] * response_mask.to(torch.float64)).to(out_dtype)
