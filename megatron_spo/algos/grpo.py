"""Group-baseline advantages: GRPO, Dr.GRPO and RLOO (docs/algorithms.md §4), and the degenerate-group statistic.

Deviations and choices (read these before comparing numbers with another framework):

1. **Singleton groups in GRPO / Dr.GRPO** follow verl's ``compute_grpo_outcome_advantage``
   (docs/algorithms.md §4): a group of size 1 gets mean 0 and std 1, so its advantage is ``r / (1 + eps)`` (GRPO) or
   ``r`` (Dr.GRPO), *not* 0. This is reproduced on purpose (it keeps parity with verl runs); a caller
   that wants singletons silenced can zero them with :func:`group_sizes`.
2. **RLOO singletons** have no leave-one-out baseline. The default (``singleton="error"``) raises a
   ``ValueError`` naming the group id and row; ``singleton="zero"`` gives them advantage 0. verl keeps the
   raw reward there; we refuse by default because a raw reward is not an advantage.
3. **Std**: unbiased (Bessel) as ``torch.std`` and docs/algorithms.md §4; ``eps`` (default 1e-6) is
   added to the std, not the variance. ``unbiased=False`` gives the population std of the treetune
   GRPO baseline (docs/algorithms.md §2.3, which also used eps 1e-8).
4. Group statistics are computed in float64 with ``index_add_`` over the group index (no Python loop over
   groups); the two-pass form Σ(r − mean)² avoids the cancellation of Σr² − n·mean².
5. Groups are formed by *equal* ids; ids need not be contiguous, sorted or non-negative.
6. Degenerate groups (size ≥ 2, all rewards equal) carry no signal. Singletons are *not* counted as
   degenerate, matching DAPO's dynamic-sampling keep rule (keep if std > 0 or the group has one sample).

Shapes: rewards ``[B]`` (float, finite), group_ids ``[B]`` (integer), response_mask ``[B, T]`` (bool or
0/1). Every estimator returns token advantages ``[B, T]``: the sequence advantage broadcast over the
response tokens and 0 where the mask is 0. Output dtype is the rewards' float dtype (float32 for integer
rewards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_spo.algos.registry import register_advantage


@dataclass
class GroupStats:
    """Per-group statistics of a batch.

    Attributes:
        ids: ``[G]`` the distinct group ids, sorted.
        index: ``[B]`` long, the position in ``ids`` of each row's group.
        count: ``[G]`` long, group sizes.
        mean: ``[G]`` float64, group mean reward.
        std: ``[G]`` float64, group std (unbiased or population as requested; 0 where undefined).
    """

    ids: torch.Tensor
    index: torch.Tensor
    count: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _check_rewards(rewards: torch.Tensor, fn: str) -> None:
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"{fn}: rewards must be a torch.Tensor [B], got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"{fn}: rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if rewards.numel() == 0:
        raise ValueError(f"{fn}: rewards is empty (B = 0); an empty batch has no groups")
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise TypeError(f"{fn}: rewards must be real numbers, got dtype {rewards.dtype}")
    if rewards.is_floating_point():
        bad = (~torch.isfinite(rewards)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"{fn}: rewards[{i}] = {rewards[i].item()} is not finite ({bad.numel()} bad entries)")


def _check_group_ids(group_ids: torch.Tensor, batch: int, fn: str) -> None:
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"{fn}: group_ids must be an integer torch.Tensor [B], got {type(group_ids).__name__}")
    if group_ids.dtype == torch.bool or group_ids.is_floating_point() or group_ids.is_complex():
        raise TypeError(f"{fn}: group_ids must have an integer dtype, got {group_ids.dtype}")
    if group_ids.shape != (batch,):
        raise ValueError(f"{fn}: group_ids shape {tuple(group_ids.shape)} != rewards shape ({batch},)")


def _check_mask(response_mask: torch.Tensor, batch: int, fn: str) -> None:
    if not isinstance(response_mask, torch.Tensor):
        raise TypeError(f"{fn}: response_mask must be a torch.Tensor [B, T], got {type(response_mask).__name__}")
    if response_mask.dim() != 2 or response_mask.shape[0] != batch:
        raise ValueError(
            f"{fn}: response_mask must be [B, T] with B = {batch} (len(rewards)), got {tuple(response_mask.shape)}"
        )
    if response_mask.dtype != torch.bool:
        bad = ((response_mask != 0) & (response_mask != 1)).nonzero()
        if bad.numel():
            i, t = (int(v) for v in bad[0])
            raise ValueError(f"{fn}: response_mask[{i}, {t}] = {response_mask[i, t].item()} is not 0/1")


def _out_dtype(rewards: torch.Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.float32


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor, *, unbiased: bool = True) -> GroupStats:
    """Size, mean and std of the rewards of every group, vectorised over groups.

    Args:
        rewards: ``[B]`` finite rewards.
        group_ids: ``[B]`` integer ids; rows with equal ids form a group.
        unbiased: Bessel's correction (n − 1). The std of a group where the divisor is 0 is 0.
    """
    fn = "group_stats"
    _check_rewards(rewards, fn)
    _check_group_ids(group_ids, rewards.shape[0], fn)
    ids, index, count = torch.unique(group_ids, return_inverse=True, return_counts=True)
    r = rewards.detach().to(torch.float64)
    n_groups = ids.numel()
    sums = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, index, r)
    mean = sums / count.to(torch.float64)
    dev = r - mean[index]
    ssd = torch.zeros_like(sums).index_add_(0, index, dev * dev)
    denom = (count - 1 if unbiased else count).to(torch.float64)
    var = torch.where(denom > 0, ssd / denom.clamp_min(1.0), torch.zeros_like(ssd))
    return GroupStats(ids=ids, index=index, count=count, mean=mean, std=var.sqrt())


def group_sizes(group_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` long: the size of each row's group (e.g. ``group_sizes(g) == 1`` marks singletons)."""
    _, index, count = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return count[index]


def _group_normalised(
    fn: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    norm_by_std: bool,
    eps: float,
    unbiased: bool,
) -> torch.Tensor:
    _check_rewards(rewards, fn)
    _check_group_ids(group_ids, rewards.shape[0], fn)
    _check_mask(response_mask, rewards.shape[0], fn)
    if not (eps >= 0.0 and eps < float("inf")):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps}")
    st = group_stats(rewards, group_ids, unbiased=unbiased)
    single = st.count[st.index] == 1
    r = rewards.detach().to(torch.float64)
    # verl convention: a singleton group has mean 0 and std 1 (see module docstring, item 1).
    mean = torch.where(single, torch.zeros_like(r), st.mean[st.index])
    adv = r - mean
    if norm_by_std:
        std = torch.where(single, torch.ones_like(r), st.std[st.index])
        adv = adv / (std + eps)
    return (adv[:, None] * response_mask.to(torch.float64)).to(_out_dtype(rewards))


@register_advantage("grpo")
def grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, response_mask: torch.Tensor, *,
    norm_by_std: bool = True, eps: float = 1e-6, unbiased: bool = True,
) -> torch.Tensor:
    """GRPO: ``A_i = (r_i − mean_g) / (std_g + eps)`` broadcast to the response tokens.

    Args:
        rewards: ``[B]`` scalar reward per response.
        group_ids: ``[B]`` integer; the responses of one prompt share an id.
        response_mask: ``[B, T]`` bool or 0/1; tokens that receive the advantage.
        norm_by_std: divide by the group std (False gives Dr.GRPO).
        eps: added to the std.
        unbiased: Bessel-corrected group std (torch default, docs/algorithms.md §4).

    Returns:
        ``[B, T]`` token advantages, 0 outside the mask.
    """
    return _group_normalised(
        "grpo_advantages", rewards, group_ids, response_mask, norm_by_std=norm_by_std, eps=eps, unbiased=unbiased
    )


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO: ``A_i = r_i − mean_g`` (no std division), broadcast to ``[B, T]``.

    Pair it with the constant-normaliser aggregation (``seq-mean-token-sum-norm``) in the loss to remove
    the length bias as well; that part lives with the losses, not here.
    """
    return _group_normalised(
        "dr_grpo_advantages", rewards, group_ids, response_mask, norm_by_std=False, eps=0.0, unbiased=True
    )


@register_advantage("rloo")
def rloo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, response_mask: torch.Tensor, *, singleton: str = "error"
) -> torch.Tensor:
    """RLOO: ``A_i = r_i − mean_{j≠i, j∈g} r_j = (n·r_i − Σ_g r) / (n − 1)``, broadcast to ``[B, T]``.

    Args:
        singleton: ``"error"`` (default) raises on a group of size 1; ``"zero"`` gives it advantage 0.
    """
    fn = "rloo_advantages"
    if singleton not in ("error", "zero"):
        raise ValueError(f"{fn}: singleton must be 'error' or 'zero', got {singleton!r}")
    _check_rewards(rewards, fn)
    _check_group_ids(group_ids, rewards.shape[0], fn)
    _check_mask(response_mask, rewards.shape[0], fn)
    st = group_stats(rewards, group_ids)
    n = st.count[st.index].to(torch.float64)
    single = n == 1
    if singleton == "error" and bool(single.any()):
        row = int(single.nonzero()[0, 0])
        raise ValueError(
            f"{fn}: group id {int(group_ids[row])} (row {row}) has a single sample; RLOO needs >= 2 per group "
            "(pass singleton='zero' to give such rows advantage 0)"
        )
    r = rewards.detach().to(torch.float64)
    total = st.mean[st.index] * n
    adv = torch.where(single, torch.zeros_like(r), (n * r - total) / (n - 1).clamp_min(1.0))
    return (adv[:, None] * response_mask.to(torch.float64)).to(_out_dtype(rewards))


def degenerate_group_mask(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: True for rows whose group has ≥ 2 samples that all have exactly the same reward.

    Exact equality (max == min), so 0.1 + 0.2 vs 0.3 counts as different: rewards are expected to be
    produced by the same grader. DAPO dynamic sampling drops these rows.
    """
    fn = "degenerate_group_mask"
    _check_rewards(rewards, fn)
    _check_group_ids(group_ids, rewards.shape[0], fn)
    ids, index, count = torch.unique(group_ids, return_inverse=True, return_counts=True)
    r = rewards.detach().to(torch.float64)
    hi = torch.full((ids.numel(),), float("-inf"), dtype=torch.float64, device=r.device)
    hi = hi.scatter_reduce(0, index, r, "amax")
    lo = torch.full((ids.numel(),), float("inf"), dtype=torch.float64, device=r.device)
    lo = lo.scatter_reduce(0, index, r, "amin")
    degenerate = (hi == lo) & (count >= 2)
    return degenerate[index]


def degenerate_group_fraction(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Fraction of groups (over all distinct ids, singletons included) that are degenerate.

    A group is degenerate when it has ≥ 2 samples and all rewards are equal; its GRPO advantages are 0.
    """
    mask = degenerate_group_mask(rewards, group_ids)
    ids, index = torch.unique(group_ids, return_inverse=True)
    per_group = torch.zeros(ids.numel(), dtype=torch.bool, device=mask.device).scatter_(0, index, mask)
    return float(per_group.sum()) / float(ids.numel())
