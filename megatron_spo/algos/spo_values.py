"""SPO per-prompt Beta(α, β) store: key lookup, posterior means and the Beta update (docs/algorithms.md §1.2, §1.8).

This is the part of :class:`~megatron_spo.algos.spo_tracker.ValueTracker` that holds the success
estimates; the tracker adds ρ, the row memory and the drift ledger around it. Choices where the
reference (verl-recipe ``spo/spo_ray_trainer.py``) is silent or lax:

1. **Unknown prompt keys** raise ``KeyError`` naming the key (:meth:`BetaStore.indices`). The sampler
   gives untracked pool prompts weight 0 via :meth:`BetaStore.index_of` (−1 = untracked), as the
   reference does. New prompts are added explicitly with :meth:`BetaStore.add`.
2. **Duplicate keys in one update** are applied in sequence (first occurrence first), as
   docs/algorithms.md §1.8 asks; sampling without replacement normally prevents them.
3. **Validation the reference does not do:** rewards must be finite and in [0, 1], ρ finite and in
   (0, 1]; each violation is a ``ValueError`` naming the key and the value. An empty batch is an error.

Storage is vectorised so that 10^6 prompts cost a few tens of MB: a ``key → index`` dict and tensors
``alpha``, ``beta`` (float64) and ``n_visits`` (int64) of shape ``[P]`` (P = tracked prompts). An
update is a few index operations on those tensors; only the key lookup is a Python loop.

Units: α, β are pseudo-counts (successes, failures); v̂ = α/(α+β) ∈ (0, 1) is the success probability.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

F64 = torch.float64


def as_1d_float(x: Any, name: str, batch: int) -> torch.Tensor:
    """``x`` as a float64 CPU tensor ``[batch]``; a clear error for a wrong shape or type."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x, dtype=F64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a tensor or sequence of numbers [B]: {e}") from None
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be real numbers, got dtype {x.dtype}")
    if x.shape != (batch,):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected ({batch},) — one entry per key")
    return x.detach().to(device="cpu", dtype=F64)


def broadcast_scalar(x: Any, k: int) -> Any:
    """A Python number or 0-d tensor repeated ``k`` times; anything else unchanged."""
    if isinstance(x, (int, float)) or (isinstance(x, torch.Tensor) and x.dim() == 0):
        return torch.as_tensor(x, dtype=F64).expand(k)
    return x


def check_keys(keys: Sequence[str], fn: str) -> List[str]:
    """``keys`` as a non-empty list; a single str (a common slip) is a ``TypeError``."""
    if isinstance(keys, str):
        raise TypeError(f"{fn}: keys must be a sequence of str, got a single str {keys[:60]!r}")
    keys = list(keys)
    if not keys:
        raise ValueError(f"{fn}: empty batch (no keys)")
    return keys


def check_rewards_and_rho(keys: Sequence[str], rewards: Any, rho: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(r, ρ)`` as float64 ``[B]`` after checking r ∈ [0, 1] and ρ ∈ (0, 1], both finite."""
    b = len(keys)
    r = as_1d_float(rewards, "rewards", b)
    rho_t = as_1d_float(rho, "rho", b)
    bad = (~(torch.isfinite(r) & (r >= 0) & (r <= 1))).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"update: reward {r[i].item()} of prompt {keys[i][:80]!r} (position {i}) is not in [0, 1]")
    bad = (~(torch.isfinite(rho_t) & (rho_t > 0) & (rho_t <= 1))).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"update: rho {rho_t[i].item()} of prompt {keys[i][:80]!r} (position {i}) is not in (0, 1]")
    return r, rho_t


class BetaStore:
    """Beta(α, β) pseudo-counts and a visit counter per tracked prompt key, in insertion order."""

    def __init__(self) -> None:
        self._index: Dict[str, int] = {}
        self._keys: List[str] = []
        self.alpha = torch.empty(0, dtype=F64)
        self.beta = torch.empty(0, dtype=F64)
        self.n_visits = torch.empty(0, dtype=torch.int64)

    def add(self, keys: List[str], alpha: Any, beta: Any) -> None:
        """Start tracking ``keys`` (checked, non-empty) with priors ``alpha``, ``beta`` ([K] or scalars, > 0).

        Raises ``ValueError`` for a key that is already tracked, repeated, empty or not a str, and for a
        non-finite or non-positive prior; nothing changes then.
        """
        k = len(keys)
        alpha = as_1d_float(broadcast_scalar(alpha, k), "alpha", k)
        beta = as_1d_float(broadcast_scalar(beta, k), "beta", k)
        for name, t in (("alpha", alpha), ("beta", beta)):
            bad = (~(torch.isfinite(t) & (t > 0))).nonzero()
            if bad.numel():
                i = int(bad[0, 0])
                raise ValueError(f"prior {name} of prompt {keys[i]!r} is {t[i].item()}; must be finite and > 0")
        start = len(self._keys)
        new_index: Dict[str, int] = {}
        for i, key in enumerate(keys):
            if not isinstance(key, str) or not key:
                raise ValueError(f"prompt key at position {i} must be a non-empty str, got {key!r}")
            if key in self._index or key in new_index:
                raise ValueError(f"prompt key {key[:80]!r} is already tracked (position {i})")
            new_index[key] = start + i
        self._index.update(new_index)
        self._keys.extend(keys)
        self.alpha = torch.cat([self.alpha, alpha.clone()])
        self.beta = torch.cat([self.beta, beta.clone()])
        self.n_visits = torch.cat([self.n_visits, torch.zeros(k, dtype=torch.int64)])

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def keys(self) -> List[str]:
        """Tracked keys in index order (a copy)."""
        return list(self._keys)

    def index_of(self, keys: Sequence[str]) -> torch.Tensor:
        """``[B]`` int64 index of each key, −1 for an untracked key (never raises for those)."""
        if isinstance(keys, str):
            raise TypeError(f"index_of: keys must be a sequence of str, got a single str {keys[:60]!r}")
        get = self._index.get
        return torch.tensor([get(k, -1) for k in keys], dtype=torch.int64)

    def indices(self, keys: Sequence[str], fn: str = "ValueTracker") -> torch.Tensor:
        """``[B]`` int64 index of each key; ``KeyError`` naming the first untracked key."""
        idx = self.index_of(keys)
        missing = (idx < 0).nonzero()
        if missing.numel():
            i = int(missing[0, 0])
            raise KeyError(
                f"{fn}: prompt key {keys[i][:120]!r} (batch position {i}) is not tracked "
                f"({missing.numel()} untracked in this batch); it is missing from the offline values, "
                "or its text differs from the key used there"
            )
        return idx

    def values_at(self, idx: torch.Tensor) -> torch.Tensor:
        """``[B]`` float64 v̂ = α/(α+β) at indices ``idx`` (all ≥ 0)."""
        a, b = self.alpha[idx], self.beta[idx]
        return a / (a + b)

    def update(self, keys: List[str], idx: torch.Tensor, r: torch.Tensor, rho: torch.Tensor) -> None:
        """α ← ρ·α + r, β ← ρ·β + (1 − r), n_visits += 1 at ``idx`` ``[B]`` (``r``, ``rho``: checked ``[B]``).

        A key repeated in ``keys`` is updated once per occurrence, in order.
        """
        b = len(keys)
        if len(set(keys)) == b:
            rounds = [torch.arange(b)]
        else:  # round j holds each key's j-th occurrence, so every round has distinct indices
            seen: Dict[str, int] = {}
            occ = []
            for k in keys:
                occ.append(seen.get(k, 0))
                seen[k] = occ[-1] + 1
            occ_t = torch.tensor(occ)
            rounds = [(occ_t == j).nonzero().flatten() for j in range(int(occ_t.max()) + 1)]
        for sel in rounds:
            p, rr, rh = idx[sel], r[sel], rho[sel]
            self.alpha[p] = rh * self.alpha[p] + rr
            self.beta[p] = rh * self.beta[p] + (1.0 - rr)
            self.n_visits[p] += 1

    def set_state(self, keys: List[str], alpha: torch.Tensor, beta: torch.Tensor, n_visits: torch.Tensor) -> None:
        """Replace everything with saved state (checked by the caller: distinct keys, ``[P]`` tensors)."""
        self._keys = keys
        self._index = {k: i for i, k in enumerate(keys)}
        self.alpha = alpha.to(F64).clone()
        self.beta = beta.to(F64).clone()
        self.n_visits = n_visits.to(torch.int64).clone()
