"""SegPO SPO-chain (docs/algorithms.md §2.1): probability-guided cut points, segment advantages, probability mask.

Deviations and choices:

1. **First-segment quirk (docs/algorithms.md §6 item 6): reproduced by default, fix available.** With the reference
   rules the first valued position gets advantage 0 unless a base value V(prompt) exists, and a base
   exists only when the very first response token is low-probability (cut at −1). So the first segment
   usually trains with advantage 0. :func:`chain_cutpoints` reproduces this by default;
   ``include_prompt_cut=True`` always adds the cut −1 (after the every-k-th subsampling), so the rollout
   layer also estimates V(prompt) and the first segment gets ``V_1 − V(prompt)``. The advantage function
   itself is the same in both modes: it follows whatever cuts and values it is given.
2. **Threshold boundary.** The reference zeroes advantages where p > 0.9 but gives gradient where
   p < 0.9; a token with p exactly 0.9 falls between. We use ``p < threshold`` everywhere (candidate
   cuts, advantage mask, loss/whitening mask), so p = 0.9 counts as high-probability.
3. **Masked tokens are never cut candidates.** Positions where ``response_mask`` is 0 (padding, tool
   output) are skipped when choosing cuts; the reference has no such tokens in single-turn chains.
4. **Prefix queries are token ids, not decoded text** (token-in/token-out design): prefix = prompt ids +
   response ids ``[0..c]``. Identical id sequences are de-duplicated across the batch.
5. **Cut range.** A cut c lies in ``[−1, T−2]`` (c = t − 1 for a token t ≤ T−1); c = T−1 would duplicate
   the final state, whose value is the trajectory's own reward, and is rejected.
6. **Whitening** uses :func:`megatron_spo.algos.normalize.whiten` (``(A − mean)/sqrt(var + 1e-8)``,
   unbiased variance, cross-rank sums) over response tokens with old prob < threshold, falling back to all
   response tokens when *no rank* has such a token (the count is reduced across ranks first, so every
   rank takes the same branch). Tokens outside the statistics mask are returned as 0; the reference
   returns ``(0 − mean)/std`` there, but those tokens receive no gradient under the prob-masked loss, so
   the loss is the same.

Shapes: a single chain is 1-D ``[T]`` over its response tokens; batches are ``[B, T]`` with a response
mask. Cut positions are 0-based indices into the response (−1 = the prompt state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from megatron_spo.algos.normalize import ReduceFn, whiten

IntSeq = Union[torch.Tensor, Sequence[int]]
FloatSeq = Union[torch.Tensor, Sequence[float]]


def _as_long_1d(x: IntSeq, name: str, fn: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(list(x), dtype=torch.long)
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{fn}: {name} must hold integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{fn}: {name} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(torch.long)


def _as_float_1d(x: FloatSeq, name: str, fn: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(list(x), dtype=torch.float64)
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    if t.dim() != 1:
        raise ValueError(f"{fn}: {name} must be 1-D, got shape {tuple(t.shape)}")
    t = t.detach().to(torch.float64)
    bad = (~torch.isfinite(t)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"{fn}: {name}[{i}] = {t[i].item()} is not finite")
    return t


def _check_finite_scalar(x: float, name: str, fn: str) -> float:
    v = float(x)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{fn}: {name} = {v} is not finite")
    return v


def _check_threshold(threshold: float, fn: str) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"{fn}: threshold must be in (0, 1], got {threshold}")


def probability_mask(
    old_probs: torch.Tensor, threshold: float = 0.9, response_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Bool mask of low-probability tokens: ``old_probs < threshold`` (and ``response_mask`` if given).

    Args:
        old_probs: any shape (``[T]`` or ``[B, T]``), probabilities in [0, 1] (not log-probs).
        threshold: 0.9 in the reference (hard-coded there).
        response_mask: same shape, bool or 0/1.
    """
    fn = "probability_mask"
    _check_threshold(threshold, fn)
    if not old_probs.is_floating_point():
        raise TypeError(f"probability_mask: old_probs must be float probabilities, got dtype {old_probs.dtype}")
    bad = (~((old_probs >= 0) & (old_probs <= 1))).nonzero()
    if bad.numel():
        idx = tuple(int(v) for v in bad[0])
        raise ValueError(
            f"probability_mask: old_probs{list(idx)} = {old_probs[idx].item()} is not a probability in [0, 1] "
            "(pass exp(logprobs), not log-probs)"
        )
    low = old_probs < threshold
    if response_mask is not None:
        if response_mask.shape != old_probs.shape:
            raise ValueError(
                f"probability_mask: response_mask shape {tuple(response_mask.shape)} != "
                f"old_probs shape {tuple(old_probs.shape)}"
            )
        low = low & response_mask.bool()
    return low


def chain_cutpoints(
    token_probs: torch.Tensor,
    response_mask: Optional[torch.Tensor] = None,
    threshold: float = 0.9,
    interval: int = 5,
    *,
    include_prompt_cut: bool = False,
) -> torch.Tensor:
    """Cut positions of one trajectory (docs/algorithms.md §2.1(a)).

    Candidates are the tokens t with ``p_t < threshold`` (and mask 1); each gives the cut c = t − 1 (the
    state just before t; −1 is the prompt). Every ``interval``-th candidate is kept, starting with the
    first: ``L[0], L[k], L[2k], …``.

    Args:
        token_probs: ``[T]`` current-policy probability of each response token.
        response_mask: ``[T]`` bool or 0/1, or None for all tokens.
        threshold: low-probability threshold (0.9).
        interval: k, ``cutpoint_interval`` (5 by default, "int5").
        include_prompt_cut: also cut at −1 so V(prompt) is estimated (fixes the first-segment quirk;
            see module docstring item 1).

    Returns:
        ``[m]`` long, strictly increasing cut positions in ``[−1, T−2]``.
    """
    fn = "chain_cutpoints"
    if token_probs.dim() != 1:
        raise ValueError(f"{fn}: token_probs must be 1-D [T], got shape {tuple(token_probs.shape)}")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"{fn}: interval must be an int >= 1, got {interval!r}")
    low = probability_mask(token_probs, threshold, response_mask)
    cuts = low.nonzero().flatten() - 1
    cuts = cuts[::interval]
    if include_prompt_cut and (cuts.numel() == 0 or int(cuts[0]) != -1):
        cuts = torch.cat([torch.tensor([-1], dtype=torch.long, device=cuts.device), cuts])
    return cuts.to(torch.long)


def _check_cuts(cuts: torch.Tensor, length: int, fn: str, name: str = "cut_positions") -> None:
    if cuts.numel() == 0:
        return
    if cuts.numel() > 1:
        step = cuts[1:] - cuts[:-1]
        bad = (step <= 0).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(
                f"{fn}: {name} must be strictly increasing; {name}[{i}] = {int(cuts[i])} >= "
                f"{name}[{i + 1}] = {int(cuts[i + 1])}"
            )
    lo, hi = int(cuts[0]), int(cuts[-1])
    if lo < -1 or hi > length - 2:
        which = 0 if lo < -1 else cuts.numel() - 1
        raise ValueError(
            f"{fn}: {name}[{which}] = {int(cuts[which])} is outside [-1, T-2] = [-1, {length - 2}] for T = {length}"
        )


def chain_segment_advantages(
    T: int,
    cut_positions: IntSeq,
    cut_values: FloatSeq,
    final_reward: float,
    base_value: Optional[float] = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token advantages of one chain from its cut values (docs/algorithms.md §2.1(c)).

    Valued positions are the cuts c_1 < … < c_m (value V_k) and the last token T−1 (value R, the
    trajectory's reward). The advantage of a valued position is its value minus the previous valued
    position's value; the first one gets ``V_1 − base`` when a base V(prompt) is known and 0 otherwise.
    Token t gets the advantage of the next valued position at or after t, so segment (c_{k−1}, c_k] gets
    ``V_k − V_{k−1}`` and the tail (c_m, T−1] gets ``R − V_m``. No cuts and no base: all zeros.

    The base is given either as a leading cut at −1 (its value is then the base; the reference form) or as
    ``base_value``; giving both is an error.

    Args:
        T: response length (number of response tokens, ≥ 1).
        cut_positions: ``[m]`` strictly increasing ints in ``[−1, T−2]``.
        cut_values: ``[m]`` Monte-Carlo values of the cut states (mean reward of K completions).
        final_reward: R.
        base_value: V(prompt), or None.

    Returns:
        ``[T]`` advantages (no probability mask applied; see :func:`probability_mask`).
    """
    fn = "chain_segment_advantages"
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"{fn}: T must be an int >= 1, got {T!r}")
    # Cut lists are short; work on the CPU whatever device they came from.
    cuts = _as_long_1d(cut_positions, "cut_positions", fn).cpu()
    values = _as_float_1d(cut_values, "cut_values", fn).cpu()
    if cuts.numel() != values.numel():
        raise ValueError(
            f"{fn}: cut_values has {values.numel()} entries but cut_positions has {cuts.numel()}; "
            "one value per cut is required"
        )
    _check_cuts(cuts, T, fn)
    reward = _check_finite_scalar(final_reward, "final_reward", fn)
    base: Optional[float] = None
    if base_value is not None:
        base = _check_finite_scalar(base_value, "base_value", fn)
    if cuts.numel() and int(cuts[0]) == -1:
        if base is not None:
            raise ValueError(f"{fn}: base given twice (cut_positions[0] = -1 and base_value = {base_value})")
        base = float(values[0])
        cuts, values = cuts[1:], values[1:]

    positions = torch.cat([cuts, torch.tensor([T - 1], dtype=torch.long)])
    vals = torch.cat([values, torch.tensor([reward], dtype=torch.float64)])
    prev = torch.cat([torch.tensor([0.0 if base is None else base], dtype=torch.float64), vals[:-1]])
    adv_at = vals - prev
    if base is None:
        # Reference quirk: without V(prompt) the first valued position has nothing to difference against.
        adv_at[0] = 0.0
    # searchsorted(left) = index of the first valued position >= t.
    owner = torch.searchsorted(positions, torch.arange(T, dtype=torch.long))
    return adv_at[owner].to(dtype)


def _row_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` long: index of the last valid token + 1 (0 for an empty row)."""
    T = response_mask.shape[1]
    pos = torch.arange(1, T + 1).expand_as(response_mask)
    return (pos * response_mask.bool()).amax(dim=1)


def chain_advantages_batch(
    response_mask: torch.Tensor,
    cut_positions: Sequence[IntSeq],
    cut_values: Sequence[FloatSeq],
    final_rewards: FloatSeq,
    base_values: Optional[Sequence[Optional[float]]] = None,
    *,
    old_probs: Optional[torch.Tensor] = None,
    threshold: float = 0.9,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Token advantages ``[B, T]`` for a batch of chains.

    Row i's response length is its last valid token + 1; positions index that row. Entries where the
    mask is 0 are 0. With ``old_probs`` (``[B, T]`` probabilities) the probability mask of
    docs/algorithms.md §2.1(c) is also applied: tokens with ``p ≥ threshold`` get 0.

    Args:
        response_mask: ``[B, T]`` bool or 0/1.
        cut_positions / cut_values: length-B sequences of per-row cuts and their values.
        final_rewards: ``[B]`` trajectory rewards.
        base_values: length-B sequence of V(prompt) or None entries, or None.
    """
    fn = "chain_advantages_batch"
    if response_mask.dim() != 2:
        raise ValueError(f"{fn}: response_mask must be [B, T], got shape {tuple(response_mask.shape)}")
    B, T = response_mask.shape
    if B == 0:
        raise ValueError(f"{fn}: empty batch (response_mask has B = 0)")
    rewards = _as_float_1d(final_rewards, "final_rewards", fn)
    for name, seq in (("cut_positions", cut_positions), ("cut_values", cut_values), ("final_rewards", rewards)):
        if len(seq) != B:
            raise ValueError(f"{fn}: {name} has {len(seq)} rows but response_mask has B = {B}")
    if base_values is not None and len(base_values) != B:
        raise ValueError(f"{fn}: base_values has {len(base_values)} rows but response_mask has B = {B}")
    if old_probs is not None and old_probs.shape != response_mask.shape:
        raise ValueError(
            f"{fn}: old_probs shape {tuple(old_probs.shape)} != response_mask shape {tuple(response_mask.shape)}"
        )
    lengths = _row_lengths(response_mask.cpu())
    out = torch.zeros(B, T, dtype=torch.float64)  # filled row by row on the CPU, moved once below
    for i in range(B):
        L = int(lengths[i])
        n_cuts = len(cut_positions[i])
        if L == 0:
            if n_cuts:
                raise ValueError(f"{fn}: row {i} has no valid response token but {n_cuts} cut positions")
            continue
        try:
            out[i, :L] = chain_segment_advantages(
                L,
                cut_positions[i],
                cut_values[i],
                float(rewards[i]),
                None if base_values is None else base_values[i],
                dtype=torch.float64,
            )
        except ValueError as e:
            raise ValueError(f"{fn}: row {i}: {e}") from None
    keep = response_mask.bool()
    if old_probs is not None:
        keep = probability_mask(old_probs, threshold, response_mask)
    return (out.to(keep.device) * keep).to(dtype)


def whiten_segment_advantages(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    old_probs: torch.Tensor,
    *,
    threshold: float = 0.9,
    eps: float = 1e-8,
    reduce_fn: ReduceFn = None,
) -> torch.Tensor:
    """Global whitening of SegPO token advantages with the probability mask (docs/algorithms.md §2.1(d), §2.2(c)).

    Statistics (unbiased, across ranks through ``reduce_fn``) are taken over response tokens with
    ``old_probs < threshold``; if no rank has one, over all response tokens. Returns ``[B, T]`` with 0
    outside the statistics mask (see module docstring item 6).
    """
    fn = "whiten_segment_advantages"
    if advantages.shape != response_mask.shape or old_probs.shape != response_mask.shape:
        raise ValueError(
            f"{fn}: advantages {tuple(advantages.shape)}, response_mask {tuple(response_mask.shape)} and "
            f"old_probs {tuple(old_probs.shape)} must have the same shape"
        )
    low = probability_mask(old_probs, threshold, response_mask)
    # Decide the fallback on the global count so every rank whitens with the same statistics mask.
    count = torch.zeros(3, dtype=torch.float64, device=advantages.device)
    count[0] = low.sum()
    if reduce_fn is not None:
        count = reduce_fn(count)
    stats_mask = low if float(count[0]) > 0 else response_mask.bool()
    return whiten(advantages, stats_mask, eps=eps, reduce_fn=reduce_fn)


@dataclass
class PrefixQueries:
    """De-duplicated Monte-Carlo value queries for a batch of chains.

    Attributes:
        queries: the distinct prefixes (prompt ids + response ids ``[0..c]``), in first-seen order.
        owners: ``owners[i][k]`` is the index in ``queries`` of trajectory i's k-th cut.
    """

    queries: List[List[int]] = field(default_factory=list)
    owners: List[List[int]] = field(default_factory=list)

    def scatter_values(self, query_values: FloatSeq) -> List[torch.Tensor]:
        """Map one value per query (``[Q]``, e.g. the mean reward of K completions) back to per-trajectory
        cut values: a list of B float64 tensors ``[m_i]`` aligned with each trajectory's cut positions."""
        fn = "PrefixQueries.scatter_values"
        v = _as_float_1d(query_values, "query_values", fn)
        if v.numel() != len(self.queries):
            raise ValueError(f"{fn}: query_values has {v.numel()} entries but there are {len(self.queries)} queries")
        return [v[torch.as_tensor(o, dtype=torch.long)] for o in self.owners]


def build_prefix_queries(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    cut_positions: Sequence[IntSeq],
) -> PrefixQueries:
    """Build the de-duplicated prefix queries a rollout layer must value (docs/algorithms.md §2.1(b)).

    Args:
        prompt_ids: B prompt token-id lists.
        response_ids: B response token-id lists (valid tokens only, no padding).
        cut_positions: B sequences of cut positions in ``[−1, len(response)−2]``, strictly increasing.

    Returns:
        :class:`PrefixQueries`; prefix for cut c of trajectory i = ``prompt_ids[i] + response_ids[i][:c+1]``.
    """
    fn = "build_prefix_queries"
    B = len(prompt_ids)
    if len(response_ids) != B or len(cut_positions) != B:
        raise ValueError(
            f"{fn}: prompt_ids ({B}), response_ids ({len(response_ids)}) and cut_positions "
            f"({len(cut_positions)}) must have the same length"
        )
    seen: Dict[Tuple[int, ...], int] = {}
    result = PrefixQueries()
    for i in range(B):
        prompt = [int(t) for t in prompt_ids[i]]
        resp = [int(t) for t in response_ids[i]]
        cuts = _as_long_1d(cut_positions[i], f"cut_positions[{i}]", fn)
        _check_cuts(cuts, len(resp), fn, name=f"cut_positions[{i}]")
        row = []
        for c in cuts.tolist():
            key = tuple(prompt + resp[: c + 1])
            if key not in seen:
                seen[key] = len(result.queries)
                result.queries.append(list(key))
            row.append(seen[key])
        result.owners.append(row)
    return result


def keep_a_token_per_row(loss_mask: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` the narrowed mask ``loss_mask * low``, where a row left without a token keeps its first
    trained token, with advantage 0 there (the trainer families do this so that no micro-batch is left
    without a token to normalise by: the actor refuses a zero normaliser)."""
    narrowed = loss_mask * low
    empty = ((narrowed.sum(1) == 0) & (loss_mask.sum(1) > 0)).nonzero().flatten()
    narrowed[empty, loss_mask[empty].argmax(1)] = 1.0  # argmax: the first 1 of each such row
    return narrowed
