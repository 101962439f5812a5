"""SPO per-prompt value tracker: a Beta(α, β) success estimate per prompt key (spec §1.2, §1.3, §1.7, §1.8).

Deviations from the reference (verl-recipe ``spo/spo_ray_trainer.py``) and choices where spec §6 or the
spec text lists an uncertainty:

1. **Prompts with fewer than n offline scores.** The reference divides by n even when a prompt has
   m < n scores, which biases v̂0 low (spec §1.3 step 3). We use the real count m in place of n for that
   prompt: v̂0 = (s + ½)/(m + 1) and still α0 + β0 = N_init. A prompt with 0 scores (when n > 0) is an
   error naming its key; so is a non-finite score. Prompts with more than n scores keep a random n of
   them (seeded ``torch.Generator``), as ``merge_offline_values.py`` does.
2. **Unknown prompt keys** raise ``KeyError`` naming the key (reads, updates, memory). The sampler
   gives untracked pool prompts weight 0 via :meth:`ValueTracker.index_of` (−1 = untracked), as the
   reference does. New prompts can be added explicitly with :meth:`ValueTracker.add`.
3. **Two ways to get the distance D** for the KL-adaptive ρ (``rho_type="kl"``):
   - ``rho_mode="exact"`` is the reference: the tracker keeps, per prompt, the last trained row and its
     log-probs under the post-update policy; the caller re-scores that row with the current policy and
     :meth:`exact_distance` returns the masked mean |ℓ_then − ℓ_now| over its response tokens.
     A stored row whose response mask is all zero gives D = 0 (no tokens, no measured drift).
   - ``rho_mode="accumulated"`` (**a deviation**, zero extra forward passes): once per step the trainer
     reports a drift statistic it already has from the PPO update — the mean |logπ_θ − logπ_old| over
     the step's valid tokens, measured during the update — with :meth:`record_step_drift`. The tracker
     keeps the running sum C of those drifts and each prompt's C at its last update; then
     D(x) = C_now − C_last(x). Why this approximates the exact D: the exact D is the L1 log-prob
     movement of the policy, on x's last response, between the step x was last trained and now. The
     ledger difference is the sum of the per-step L1 movements over exactly those steps, measured on
     the tokens each step trained on rather than on x's response. By the triangle inequality
     |ℓ_then − ℓ_now| ≤ Σ_steps |ℓ_s − ℓ_{s−1}| token by token, so when the per-token drift on x's
     response is like the batch average the ledger is an upper estimate of the exact D: movements that
     cancel out are counted anyway, so ρ errs towards forgetting faster (never towards trusting stale
     evidence longer). The drift is measured during the update (each mini-batch against π_old), so it is
     the caller's statistic and may under-count the last mini-batch's step; the ledger only needs it
     to be consistent from step to step.
   In both modes a first visit gives D = 0, so ρ = ρ_max (0.96 by default).
4. **Duplicate keys in one** :meth:`ValueTracker.update` are applied in sequence (first occurrence
   first), as spec §1.8 asks; sampling without replacement normally prevents them.
5. **Validation the reference does not do:** rewards must be finite and in [0, 1], ρ finite and in
   (0, 1], D finite and ≥ 0, drifts finite and ≥ 0; each violation is a ``ValueError`` naming the key or
   index and the value. An empty batch is an error.
6. ``rho_max`` and ``d_half`` are constructor arguments (the reference hard-codes 0.96 and 0.06, which are
   the defaults) so that config ``algo.spo.*`` can reach them.

Storage is vectorised so that 10^6 prompts cost a few tens of MB: a ``key → index`` dict and float64
tensors ``alpha``, ``beta``, ``ledger_at_visit`` and int64 ``n_visits`` of shape ``[P]`` (P = tracked
prompts). Updates are index operations on those tensors; only the key lookup is a Python loop. In
``exact`` mode the stored rows are CPU tensors in a dict keyed by prompt index (only visited prompts).

Units: α, β are pseudo-counts (successes, failures); v̂ = α/(α+β) ∈ (0, 1) is the success probability;
D is in nats of log-probability per response token; ρ is a per-step multiplicative forgetting factor.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

_F64 = torch.float64
_FORMAT = "megatron_spo.ValueTracker/1"
RHO_TYPES = ("kl", "constant")
RHO_MODES = ("exact", "accumulated")


def _as_1d_float(x: Any, name: str, batch: int) -> torch.Tensor:
    """``x`` as a float64 CPU tensor ``[batch]``; a clear error for a wrong shape or type."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x, dtype=_F64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a tensor or sequence of numbers [B]: {e}") from None
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be real numbers, got dtype {x.dtype}")
    if x.shape != (batch,):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected ({batch},) — one entry per key")
    return x.detach().to(device="cpu", dtype=_F64)


def _broadcast_scalar(x: Any, k: int) -> Any:
    """A Python number or 0-d tensor repeated ``k`` times; anything else unchanged."""
    if isinstance(x, (int, float)) or (isinstance(x, torch.Tensor) and x.dim() == 0):
        return torch.as_tensor(x, dtype=_F64).expand(k)
    return x


def _check_keys(keys: Sequence[str], fn: str) -> List[str]:
    if isinstance(keys, str):
        raise TypeError(f"{fn}: keys must be a sequence of str, got a single str {keys[:60]!r}")
    keys = list(keys)
    if not keys:
        raise ValueError(f"{fn}: empty batch (no keys)")
    return keys


class ValueTracker:
    """Per-prompt Beta(α, β) estimates of the success probability under the current policy.

    Args (names match config ``algo.spo.*``):
        rho_type: ``"kl"`` (ρ from the distance D) or ``"constant"`` (ρ = ``rho_constant``).
        rho_mode: ``"exact"`` or ``"accumulated"`` — how D is obtained (see the module docstring).
        rho_min: lower clip of ρ; also sets the prior's effective sample size N_init = 1/(1 − ρ_min).
        rho_max: upper clip of ρ (reached on a first visit, D = 0).
        d_half: the distance that halves the memory: ρ_raw = 2^(−D/d_half).
        rho_constant: ρ for every prompt when ``rho_type="constant"``.

    Per training step (spec §1.9), for the step's keys:
        1. ``v = tracker.values(keys)`` — the baseline, **before** any update of this step;
        2. the PPO update (in accumulated mode, then ``tracker.record_step_drift(drift)``);
        3. ``rho = tracker.rho(keys, logp_now)`` — exact mode: ``logp_now`` are the current (post-update)
           log-probs of ``tracker.stored_rows(keys)``; accumulated and constant modes need none;
        4. ``tracker.update(keys, rewards, rho)``;
        5. exact mode: ``tracker.remember(keys, logp_post_update, response_mask, rows)``.

    Memory in exact mode is one stored row per visited prompt (as the reference keeps); the caller can
    shrink it by passing trimmed rows (e.g. without padding) to :meth:`remember`.
    """

    CONFIG_FIELDS = ("rho_type", "rho_mode", "rho_min", "rho_max", "d_half", "rho_constant")

    def __init__(
        self,
        *,
        rho_type: str = "kl",
        rho_mode: str = "exact",
        rho_min: float = 0.875,
        rho_max: float = 0.96,
        d_half: float = 0.06,
        rho_constant: float = 0.875,
    ) -> None:
        if rho_type not in RHO_TYPES:
            raise ValueError(f"rho_type={rho_type!r}; allowed: {list(RHO_TYPES)}")
        if rho_mode not in RHO_MODES:
            raise ValueError(f"rho_mode={rho_mode!r}; allowed: {list(RHO_MODES)}")
        # rho_min < 1 keeps N_init = 1/(1 − rho_min) finite; rho = 1 (no forgetting) is allowed otherwise.
        if not (math.isfinite(rho_min) and 0.0 < rho_min < 1.0):
            raise ValueError(f"rho_min={rho_min} must lie in (0, 1)")
        for name, v in (("rho_max", rho_max), ("rho_constant", rho_constant)):
            if not (math.isfinite(v) and 0.0 < v <= 1.0):
                raise ValueError(f"{name}={v} must lie in (0, 1]")
        if rho_min > rho_max:
            raise ValueError(f"rho_min={rho_min} must not exceed rho_max={rho_max}")
        if not (math.isfinite(d_half) and d_half > 0):
            raise ValueError(f"d_half={d_half} must be a finite number > 0")
        self.rho_type = rho_type
        self.rho_mode = rho_mode
        self.rho_min = float(rho_min)
        self.rho_max = float(rho_max)
        self.d_half = float(d_half)
        self.rho_constant = float(rho_constant)

        self._index: Dict[str, int] = {}
        self._keys: List[str] = []
        self.alpha = torch.empty(0, dtype=_F64)
        self.beta = torch.empty(0, dtype=_F64)
        self.n_visits = torch.empty(0, dtype=torch.int64)
        self.ledger_at_visit = torch.empty(0, dtype=_F64)
        self.ledger = 0.0  # C: cumulative per-step drift (accumulated mode)
        # exact mode: prompt index -> {"logp": [T], "response_mask": [T] bool, "rows": {name: tensor}}
        self._memory: Dict[int, Dict[str, Any]] = {}
        self._last: Dict[str, float] = {"rho_mean": float("nan"), "distance_mean": float("nan"), "batch": 0.0}

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------

    def config(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.CONFIG_FIELDS}

    @property
    def prior_size(self) -> float:
        """N_init = 1/(1 − ρ_min): effective sample size of the offline prior (8 at ρ_min = 0.875)."""
        return 1.0 / (1.0 - self.rho_min)

    @classmethod
    def from_offline_scores(
        cls,
        scores: Mapping[str, Sequence[float]],
        *,
        n: int = 8,
        generator: Optional[torch.Generator] = None,
        **config: Any,
    ) -> "ValueTracker":
        """Tracker with the offline prior of spec §1.3 for every key of ``scores``.

        Each score is binarised as ``score > 0``; a prompt with m > n scores keeps a random n of them
        (``generator``; None means a generator seeded with 0, so the result is deterministic); with
        m_eff = min(m, n) and s successes: α0 = N·(s + ½)/(m_eff + 1), β0 = N·(m_eff − s + ½)/(m_eff + 1),
        N = 1/(1 − ρ_min). ``n = 0`` gives α0 = β0 = ½ for every key (scores are still checked).

        Raises:
            ValueError: a non-finite score, a prompt with no scores (n > 0), n < 0, no prompts.
            TypeError: a key that is not a str, a value that is not a list of numbers.
        """
        if n < 0:
            raise ValueError(f"offline n={n} must be ≥ 0")
        tracker = cls(**config)
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
            flat = torch.tensor(flat_list, dtype=_F64)
        except (TypeError, ValueError, RuntimeError):
            for k, v in zip(keys, lists):  # slow path only to name the offending prompt
                try:
                    torch.tensor(list(v), dtype=_F64)
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
            ones = torch.full((len(keys),), 0.5, dtype=_F64)
            tracker.add(keys, ones, ones.clone())
            return tracker
        empty = (counts == 0).nonzero()
        if empty.numel():
            raise ValueError(
                f"prompt {keys[int(empty[0, 0])]!r} has no offline scores ({empty.numel()} such prompts); "
                "remove it from the file or give it scores"
            )
        wins = (flat > 0).to(_F64)
        seg = torch.repeat_interleave(torch.arange(len(keys)), counts)
        s = torch.zeros(len(keys), dtype=_F64).index_add_(0, seg, wins)
        over = (counts > n).nonzero().flatten().tolist()
        if over:
            g = generator if generator is not None else torch.Generator().manual_seed(0)
            starts = ends - counts
            for p in over:  # only prompts with more than n scores need a random subset
                keep = torch.randperm(int(counts[p]), generator=g)[:n]
                s[p] = wins[int(starts[p]) + keep].sum()
        m = counts.clamp(max=n).to(_F64)
        big_n = tracker.prior_size
        alpha0 = big_n * (s + 0.5) / (m + 1.0)
        beta0 = big_n * (m - s + 0.5) / (m + 1.0)
        tracker.add(keys, alpha0, beta0)
        return tracker

    def add(self, keys: Sequence[str], alpha: Any, beta: Any) -> None:
        """Start tracking new prompts with prior pseudo-counts ``alpha``, ``beta`` ([K] or scalars, > 0).

        Raises ``ValueError`` for a key that is already tracked, repeated, empty or not a str, and for a
        non-finite or non-positive prior.
        """
        keys = _check_keys(keys, "ValueTracker.add")
        k = len(keys)
        alpha = _as_1d_float(_broadcast_scalar(alpha, k), "alpha", k)
        beta = _as_1d_float(_broadcast_scalar(beta, k), "beta", k)
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
        self.ledger_at_visit = torch.cat([self.ledger_at_visit, torch.zeros(k, dtype=_F64)])

    # ------------------------------------------------------------------------------------------
    # Lookup
    # ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def keys(self) -> List[str]:
        """Tracked keys in index order (a copy)."""
        return list(self._keys)

    def index_of(self, keys: Sequence[str]) -> torch.Tensor:
        """``[B]`` int64 tracker index of each key, −1 for an untracked key (never raises for those)."""
        if isinstance(keys, str):
            raise TypeError(f"index_of: keys must be a sequence of str, got a single str {keys[:60]!r}")
        get = self._index.get
        return torch.tensor([get(k, -1) for k in keys], dtype=torch.int64)

    def indices(self, keys: Sequence[str], fn: str = "ValueTracker") -> torch.Tensor:
        """``[B]`` int64 tracker index of each key; ``KeyError`` naming the first untracked key."""
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

    def values(self, keys: Sequence[str]) -> torch.Tensor:
        """``[B]`` float64 posterior means v̂ = α/(α+β). ``KeyError`` for an untracked key."""
        keys = _check_keys(keys, "ValueTracker.values")
        return self.values_at(self.indices(keys, "ValueTracker.values"))

    def values_at(self, idx: torch.Tensor) -> torch.Tensor:
        """``[B]`` float64 v̂ at tracker indices ``idx`` (all ≥ 0)."""
        a, b = self.alpha[idx], self.beta[idx]
        return a / (a + b)

    # ------------------------------------------------------------------------------------------
    # Forgetting factor ρ
    # ------------------------------------------------------------------------------------------

    def rho_from_distance(self, distance: torch.Tensor) -> torch.Tensor:
        """ρ per prompt from the distance D (any shape, finite, ≥ 0), float64, same shape.

        ``kl``: ρ = clip(2^(−D/d_half), ρ_min, ρ_max). ``constant``: ρ = rho_constant (D is still checked).
        """
        d = torch.as_tensor(distance).detach().to(device="cpu", dtype=_F64)
        bad = (~(torch.isfinite(d) & (d >= 0))).flatten().nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"distance D[{i}] = {d.flatten()[i].item()}; must be finite and ≥ 0")
        if self.rho_type == "constant":
            return torch.full_like(d, self.rho_constant)
        return torch.exp2(-d / self.d_half).clamp(self.rho_min, self.rho_max)

    def rho(self, keys: Sequence[str], logp_now: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """``[B]`` ρ for ``keys`` in the configured type and mode (call after the step's actor update).

        ``constant``: rho_constant. ``kl`` + ``exact``: from :meth:`exact_distance` (needs ``logp_now``).
        ``kl`` + ``accumulated``: from :meth:`accumulated_distance`.
        """
        keys = _check_keys(keys, "ValueTracker.rho")
        if self.rho_type == "constant":
            self.indices(keys, "ValueTracker.rho")
            return torch.full((len(keys),), self.rho_constant, dtype=_F64)
        if self.rho_mode == "exact":
            if logp_now is None:
                raise ValueError("ValueTracker.rho: rho_mode='exact' needs logp_now (stored rows re-scored now)")
            return self.rho_from_distance(self.exact_distance(keys, logp_now))
        return self.rho_from_distance(self.accumulated_distance(keys))

    # exact mode --------------------------------------------------------------------------------

    def remember(
        self,
        keys: Sequence[str],
        logp: torch.Tensor,
        response_mask: torch.Tensor,
        rows: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> None:
        """Store this step's rows and their **post-update** log-probs (exact mode, spec §1.7 step 7).

        Args:
            keys: ``B`` prompt keys (tracked).
            logp: ``[B, T]`` per-token log-probs of each row under the just-updated policy.
            response_mask: ``[B, T]`` bool/0-1, 1 on the model's response tokens (0 on prompt, padding and
                tool output); D is averaged over these positions.
            rows: optional tensors with leading dim B (token ids, positions, ...) the caller needs to
                re-score the row later; stored as given (row i of each), on CPU, returned by
                :meth:`stored_rows`.
        A key seen again replaces its previous row; a key repeated in ``keys`` keeps its last row.
        """
        if self.rho_mode != "exact":
            raise ValueError("ValueTracker.remember is for rho_mode='exact'; accumulated mode stores no rows")
        keys = _check_keys(keys, "ValueTracker.remember")
        b = len(keys)
        if logp.dim() != 2 or logp.shape[0] != b:
            raise ValueError(f"remember: logp shape {tuple(logp.shape)}, expected [{b}, T]")
        if response_mask.shape != logp.shape:
            raise ValueError(f"remember: response_mask shape {tuple(response_mask.shape)} != logp shape {tuple(logp.shape)}")
        rows = dict(rows or {})
        for name, t in rows.items():
            if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != b:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"remember: rows[{name!r}] must be a tensor with leading dim {b}, got {shape}")
        idx = self.indices(keys, "ValueTracker.remember")
        lp = logp.detach().to("cpu")
        mask = response_mask.detach().to("cpu").bool()
        bad = (mask & ~torch.isfinite(lp)).nonzero()
        if bad.numel():
            i, t = int(bad[0, 0]), int(bad[0, 1])
            raise ValueError(f"remember: logp of prompt {keys[i][:80]!r} is {lp[i, t].item()} at response token {t}")
        cpu_rows = {name: t.detach().to("cpu") for name, t in rows.items()}
        for i, p in enumerate(idx.tolist()):
            self._memory[p] = {
                "logp": lp[i].clone(),
                "response_mask": mask[i].clone(),
                "rows": {name: t[i].clone() for name, t in cpu_rows.items()},
            }

    def has_memory(self, keys: Sequence[str]) -> torch.Tensor:
        """``[B]`` bool: the key has a stored row (false on a first visit). ``KeyError`` if untracked."""
        idx = self.indices(keys, "ValueTracker.has_memory")
        return torch.tensor([p in self._memory for p in idx.tolist()], dtype=torch.bool)

    def stored_rows(self, keys: Sequence[str]) -> List[Optional[Dict[str, torch.Tensor]]]:
        """Per key the stored row dict (``rows`` given to :meth:`remember` plus ``"response_mask"``), or
        None on a first visit. The caller re-scores these with the current policy for :meth:`exact_distance`."""
        idx = self.indices(keys, "ValueTracker.stored_rows")
        out: List[Optional[Dict[str, torch.Tensor]]] = []
        for p in idx.tolist():
            mem = self._memory.get(p)
            out.append(None if mem is None else {**mem["rows"], "response_mask": mem["response_mask"]})
        return out

    def exact_distance(self, keys: Sequence[str], logp_now: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """``[B]`` float64 D = masked mean over the stored response tokens of |ℓ_then − ℓ_now|.

        Args:
            keys: ``B`` prompt keys.
            logp_now: length ``B``; item i is the current policy's log-probs ``[T_i]`` of key i's stored row
                (same shape as stored), or None / anything for a key without a stored row (first visit,
                D = 0). A ``[B, T]`` tensor works when every stored row has length T.
        """
        keys = _check_keys(keys, "ValueTracker.exact_distance")
        if len(logp_now) != len(keys):
            raise ValueError(f"exact_distance: {len(logp_now)} logp rows for {len(keys)} keys")
        idx = self.indices(keys, "ValueTracker.exact_distance")
        out = torch.zeros(len(keys), dtype=_F64)
        for i, p in enumerate(idx.tolist()):
            mem = self._memory.get(p)
            if mem is None:
                continue
            now = logp_now[i]
            then, mask = mem["logp"], mem["response_mask"]
            if not isinstance(now, torch.Tensor) or now.shape != then.shape:
                shape = tuple(now.shape) if isinstance(now, torch.Tensor) else now
                raise ValueError(
                    f"exact_distance: logp_now for prompt {keys[i][:80]!r} (position {i}) has shape {shape}; "
                    f"its stored row has shape {tuple(then.shape)}"
                )
            now = now.detach().to(device="cpu", dtype=_F64)
            if not bool(torch.isfinite(now[mask]).all()):
                raise ValueError(f"exact_distance: logp_now for prompt {keys[i][:80]!r} has non-finite response values")
            count = int(mask.sum())
            if count:  # an empty response carries no drift measurement: D stays 0
                out[i] = (then.to(_F64) - now).abs()[mask].sum() / count
        self._last["distance_mean"] = float(out.mean())
        return out

    # accumulated mode ----------------------------------------------------------------------------

    def record_step_drift(self, drift: float) -> None:
        """Add one step's drift (mean |logπ_θ − logπ_old| over the step's valid tokens, ≥ 0) to the ledger."""
        d = float(drift)
        if not (math.isfinite(d) and d >= 0):
            raise ValueError(f"record_step_drift: drift={d}; must be finite and ≥ 0")
        self.ledger += d

    def accumulated_distance(self, keys: Sequence[str]) -> torch.Tensor:
        """``[B]`` float64 D = C_now − C_last(x): drift accumulated since x's last update; 0 on a first visit."""
        keys = _check_keys(keys, "ValueTracker.accumulated_distance")
        idx = self.indices(keys, "ValueTracker.accumulated_distance")
        d = (self.ledger - self.ledger_at_visit[idx]).clamp_min(0.0)
        d = torch.where(self.n_visits[idx] > 0, d, torch.zeros_like(d))
        self._last["distance_mean"] = float(d.mean())
        return d

    # ------------------------------------------------------------------------------------------
    # Update
    # ------------------------------------------------------------------------------------------

    def update(self, keys: Sequence[str], rewards: Any, rho: Any) -> None:
        """α ← ρ·α + r, β ← ρ·β + (1 − r), n_visits += 1 for each key (spec §1.8), in float64.

        Args:
            keys: ``B`` tracked prompt keys; a repeated key is updated once per occurrence, in order.
            rewards: ``[B]`` finite, in [0, 1] (fractional success allowed).
            rho: ``[B]`` finite, in (0, 1].
        Validation happens before any state changes, so a rejected batch leaves the tracker untouched.
        """
        keys = _check_keys(keys, "ValueTracker.update")
        b = len(keys)
        r = _as_1d_float(rewards, "rewards", b)
        rho_t = _as_1d_float(rho, "rho", b)
        bad = (~(torch.isfinite(r) & (r >= 0) & (r <= 1))).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"update: reward {r[i].item()} of prompt {keys[i][:80]!r} (position {i}) is not in [0, 1]")
        bad = (~(torch.isfinite(rho_t) & (rho_t > 0) & (rho_t <= 1))).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"update: rho {rho_t[i].item()} of prompt {keys[i][:80]!r} (position {i}) is not in (0, 1]")
        idx = self.indices(keys, "ValueTracker.update")
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
            p, rr, rh = idx[sel], r[sel], rho_t[sel]
            self.alpha[p] = rh * self.alpha[p] + rr
            self.beta[p] = rh * self.beta[p] + (1.0 - rr)
            self.n_visits[p] += 1
        self.ledger_at_visit[idx] = self.ledger
        self._last["rho_mean"] = float(rho_t.mean())
        self._last["batch"] = float(b)

    # ------------------------------------------------------------------------------------------
    # Metrics and state
    # ------------------------------------------------------------------------------------------

    def metrics(self) -> Dict[str, float]:
        """Scalars for logging: tracked/visited counts, mean v̂, last update's mean ρ and mean D, ledger."""
        n = len(self._keys)
        v = self.alpha / (self.alpha + self.beta) if n else torch.zeros(0, dtype=_F64)
        visited = self.n_visits > 0
        return {
            "spo/tracked_prompts": float(n),
            "spo/visited_prompts": float(visited.sum()),
            "spo/value_mean": float(v.mean()) if n else float("nan"),
            "spo/value_mean_visited": float(v[visited].mean()) if bool(visited.any()) else float("nan"),
            "spo/rho_mean": self._last["rho_mean"],
            "spo/distance_mean": self._last["distance_mean"],
            "spo/update_batch": self._last["batch"],
            "spo/drift_ledger": self.ledger,
            "spo/stored_rows": float(len(self._memory)),
        }

    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors, lists, dicts, floats and str only: ``torch.load(..., weights_only=True)`` reads it."""
        mem_index = sorted(self._memory)
        return {
            "format": _FORMAT,
            "config": self.config(),
            "keys": list(self._keys),
            "alpha": self.alpha.clone(),
            "beta": self.beta.clone(),
            "n_visits": self.n_visits.clone(),
            "ledger_at_visit": self.ledger_at_visit.clone(),
            "ledger": self.ledger,
            "last": dict(self._last),
            "memory_index": torch.tensor(mem_index, dtype=torch.int64),
            "memory": [
                {"logp": self._memory[p]["logp"].clone(), "response_mask": self._memory[p]["response_mask"].clone(),
                 "rows": {k: t.clone() for k, t in self._memory[p]["rows"].items()}}
                for p in mem_index
            ],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "ValueTracker":
        """A tracker with the saved config and state."""
        tracker = cls(**dict(state["config"]))
        tracker.load_state_dict(state)
        return tracker

    def load_state_dict(self, state: Mapping[str, Any], *, strict_config: bool = True) -> None:
        """Restore :meth:`state_dict` output. With ``strict_config`` a saved config field that differs from
        this tracker's raises ``ValueError`` naming it; otherwise this tracker's config is kept."""
        if state.get("format") != _FORMAT:
            raise ValueError(f"not a ValueTracker state (format {state.get('format')!r}, expected {_FORMAT!r})")
        if strict_config:
            for name, value in dict(state["config"]).items():
                if getattr(self, name) != value:
                    raise ValueError(f"tracker config {name}: saved {value!r} != current {getattr(self, name)!r}")
        keys = list(state["keys"])
        p = len(keys)
        tensors = {name: state[name] for name in ("alpha", "beta", "n_visits", "ledger_at_visit")}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.shape != (p,):
                raise ValueError(f"tracker state {name!r} has shape {getattr(t, 'shape', None)}, expected ({p},)")
        index = {k: i for i, k in enumerate(keys)}
        if len(index) != p:
            raise ValueError("tracker state has repeated keys")
        mem_index = state["memory_index"].tolist()
        if len(mem_index) != len(state["memory"]) or any(not 0 <= i < p for i in mem_index):
            raise ValueError("tracker state memory_index does not match its memory list or keys")
        self._keys = keys
        self._index = index
        self.alpha = tensors["alpha"].to(_F64).clone()
        self.beta = tensors["beta"].to(_F64).clone()
        self.n_visits = tensors["n_visits"].to(torch.int64).clone()
        self.ledger_at_visit = tensors["ledger_at_visit"].to(_F64).clone()
        self.ledger = float(state["ledger"])
        self._last = dict(state["last"])
        self._memory = {
            i: {"logp": m["logp"].clone(), "response_mask": m["response_mask"].clone(),
                "rows": {k: t.clone() for k, t in m["rows"].items()}}
            for i, m in zip(mem_index, state["memory"])
        }
