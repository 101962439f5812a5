"""SPO offline prior: Beta(α0, β0) per prompt from the initial model's offline scores (docs/algorithms.md §1.3).

Each score is binarised as ``score > 0``; with s successes among the m_eff kept scores and
N = 1/(1 − ρ_min) (8 at ρ_min = 0.875):  α0 = N·(s + ½)/(m_eff + 1),  β0 = N·(m_eff − s + ½)/(m_eff + 1),
so α0 + β0 = N and v̂0 = (s + ½)/(m_eff + 1). ``n = 0`` gives α0 = β0 = ½ for every prompt.

Deviations from the reference (verl-recipe ``spo/spo_ray_trainer.py``, ``fit()`` preamble) and choices:

1. **Prompts with fewer than n offline scores.** The reference divides by n even when a prompt has
   m < n scores, which biases v̂0 low. We use the real count m in place of n for that prompt:
   m_eff = min(m, n), and still α0 + β0 = N. A prompt with 0 scores (when n > 0) is an error naming
   its key; so is a non-finite score.
2. Prompts with more than n scores keep a random n of them (a seeded ``torch.Generator``; None means
   one seeded with 0, so the result is deterministic), as ``merge_offline_values.py`` does.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_spo.algos.spo_values import F64


def offline_prior(
    scores: Mapping[str, Sequence[float]],
    *,
    n: int,
    prior_size: float,
    generator: Optional[torch.Generator] = None,
) -> Tuple[List[str], torch.Tensor, torch.Tensor]:
    """``(keys, alpha0 [K], beta0 [K])`` float64 for the K prompts of ``scores``, in its order.

    Args:
        scores: prompt key → list of offline scores (any real numbers; binarised as ``> 0``).
        n: the most scores kept per prompt (≥ 0; checked by the caller).
        prior_size: N = 1/(1 − ρ_min), the prior's effective sample size α0 + β0.
        generator: source of the random subset for prompts with more than n scores.

    Raises:
        ValueError: a non-finite score, a prompt with no scores (n > 0), no prompts.
        TypeError: a value that is not a list of numbers.
    """
    keys: List[str] = []
    lists: List[Sequence[float]] = []
    for k, v in scores.items():
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"offline scores of prompt {k!r} must be a list of numbers, got {type(v).__name__}")
        keys.append(k)
        lists.append(v)
    if not keys:
        raise ValueError("offline scores: no prompts")
    counts = torch.tensor([len(v) for v in lists], dtype=torch.int64)
    flat_list = [x for v in lists for x in v]
    try:
        flat = torch.tensor(flat_list, dtype=F64)
    except (TypeError, ValueError, RuntimeError):
        for k, v in zip(keys, lists):  # slow path only to name the offending prompt
            try:
                torch.tensor(list(v), dtype=F64)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"offline scores of prompt {k!r} are not all numbers: {e}") from None
        raise
    ends = counts.cumsum(0)
    bad = (~torch.isfinite(flat)).nonzero()
    if bad.numel():
        pos = int(bad[0, 0])
        p = int(torch.searchsorted(ends, pos, right=True))
        raise ValueError(f"offline score of prompt {keys[p]!r} is not finite: {flat[pos].item()}")
    if n == 0:
        ones = torch.full((len(keys),), 0.5, dtype=F64)
        return keys, ones, ones.clone()
    empty = (counts == 0).nonzero()
    if empty.numel():
        raise ValueError(
            f"prompt {keys[int(empty[0, 0])]!r} has no offline scores ({empty.numel()} such prompts); "
            "remove it from the file or give it scores"
        )
    wins = (flat > 0).to(F64)
    seg = torch.repeat_interleave(torch.arange(len(keys)), counts)
    s = torch.zeros(len(keys), dtype=F64).index_add_(0, seg, wins)
    over = (counts > n).nonzero().flatten().tolist()
    if over:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        starts = ends - counts
        for p in over:  # only prompts with more than n scores need a random subset
            keep = torch.randperm(int(counts[p]), generator=g)[:n]
            s[p] = wins[int(starts[p]) + keep].sum()
    m = counts.clamp(max=n).to(F64)
    alpha0 = prior_size * (s + 0.5) / (m + 1.0)
    beta0 = prior_size * (m - s + 0.5) / (m + 1.0)
    return keys, alpha0, beta0
