"""SPO per-prompt value tracker: a Beta(α, β) success estimate per prompt key.

Formulas: docs/algorithms.md §1.2 (state), §1.3 (prior), §1.7 (ρ), §1.8 (update).

:class:`ValueTracker` is the one object the trainer, the sampler and checkpoints see. It composes four
parts, each in its own module with its deviations from the reference (verl-recipe
``spo/spo_ray_trainer.py``) listed at the top:

- :mod:`megatron_spo.algos.spo_values` — the Beta store: key → index, α, β, visit counts, the update;
- :mod:`megatron_spo.algos.spo_rho` — ρ from a distance D, and the accumulated-drift ledger;
- :mod:`megatron_spo.algos.spo_rows` — the exact-ρ row memory (the reference's distance);
- :mod:`megatron_spo.algos.spo_prior` — the offline prior built from the initial model's scores.

Two ways to get the distance D for the KL-adaptive ρ (``rho_type="kl"``): ``rho_mode="exact"`` (the
reference: re-score each prompt's last stored row) and ``rho_mode="accumulated"`` (a deviation: a
drift ledger fed once per step, no extra forward pass). In both a first visit gives D = 0, so
ρ = ρ_max. ``rho_type="constant"`` uses ``rho_constant`` for every prompt.

Units: α, β are pseudo-counts (successes, failures); v̂ = α/(α+β) ∈ (0, 1) is the success probability;
D is in nats of log-probability per response token; ρ is a per-step multiplicative forgetting factor.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from megatron_spo.algos.spo_prior import offline_prior
from megatron_spo.algos.spo_rho import RHO_MODES, RHO_TYPES, DriftLedger, check_rho_config, rho_from_distance
from megatron_spo.algos.spo_rows import RowMemory
from megatron_spo.algos.spo_values import F64, BetaStore, check_keys, check_rewards_and_rho

__all__ = ["ValueTracker", "RHO_TYPES", "RHO_MODES"]

_FORMAT = "megatron_spo.ValueTracker/1"


def _part_attr(part: str, name: str, doc: str) -> property:
    """A read-only attribute of the tracker that is attribute ``name`` of its part ``part``."""
    return property(lambda self: getattr(getattr(self, part), name), doc=doc)


class ValueTracker:
    """Per-prompt Beta(α, β) estimates of the success probability under the current policy.

    Args (names match config ``algo.spo.*``):
        rho_type: ``"kl"`` (ρ from the distance D) or ``"constant"`` (ρ = ``rho_constant``).
        rho_mode: ``"exact"`` or ``"accumulated"`` — how D is obtained (see the module docstring).
        rho_min: lower clip of ρ; also sets the prior's effective sample size N_init = 1/(1 − ρ_min).
        rho_max: upper clip of ρ (reached on a first visit, D = 0).
        d_half: the distance that halves the memory: ρ_raw = 2^(−D/d_half).
        rho_constant: ρ for every prompt when ``rho_type="constant"``.

    Per training step (docs/algorithms.md §1.9), for the step's keys:
        1. ``v = tracker.values(keys)`` — the baseline, **before** any update of this step;
        2. the PPO update (in accumulated mode, then ``tracker.record_step_drift(drift)``);
        3. ``rho = tracker.rho(keys, logp_now)`` — exact mode: ``logp_now`` are the current (post-update)
           log-probs of ``tracker.stored_rows(keys)``; accumulated and constant modes need none;
        4. ``tracker.update(keys, rewards, rho)``;
        5. exact mode: ``tracker.remember(keys, logp_post_update, response_mask, rows)``.

    Attributes ``alpha``, ``beta`` (float64), ``n_visits`` (int64) and ``ledger_at_visit`` (float64) are
    ``[P]`` tensors over the P tracked prompts in index order; ``ledger`` is the float C.
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
        check_rho_config(rho_type, rho_mode, rho_min, rho_max, d_half, rho_constant)
        self.rho_type = rho_type
        self.rho_mode = rho_mode
        self.rho_min = float(rho_min)
        self.rho_max = float(rho_max)
        self.d_half = float(d_half)
        self.rho_constant = float(rho_constant)
        self._values = BetaStore()
        self._ledger = DriftLedger()
        self._rows = RowMemory(self._values.indices)  # filled in exact mode only
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
        """Tracker with the offline prior of docs/algorithms.md §1.3 for every key of ``scores``.

        See :func:`megatron_spo.algos.spo_prior.offline_prior` for the formula and the handling of
        prompts with more or fewer than n scores.

        Raises:
            ValueError: a non-finite score, a prompt with no scores (n > 0), n < 0, no prompts.
            TypeError: a key that is not a str, a value that is not a list of numbers.
        """
        if n < 0:
            raise ValueError(f"offline n={n} must be ≥ 0")
        tracker = cls(**config)
        keys, alpha0, beta0 = offline_prior(scores, n=n, prior_size=tracker.prior_size, generator=generator)
        tracker.add(keys, alpha0, beta0)
        return tracker

    def add(self, keys: Sequence[str], alpha: Any, beta: Any) -> None:
        """Start tracking new prompts with prior pseudo-counts ``alpha``, ``beta`` ([K] or scalars, > 0).

        Raises ``ValueError`` for a key that is already tracked, repeated, empty or not a str, and for a
        non-finite or non-positive prior.
        """
        keys = check_keys(keys, "ValueTracker.add")
        self._values.add(keys, alpha, beta)
        self._ledger.grow(len(keys))

    # ------------------------------------------------------------------------------------------
    # State tensors (read-only attributes; the parts own them)
    # ------------------------------------------------------------------------------------------

    alpha = _part_attr("_values", "alpha", "``[P]`` float64 α (success pseudo-counts), in index order.")
    beta = _part_attr("_values", "beta", "``[P]`` float64 β (failure pseudo-counts), in index order.")
    n_visits = _part_attr("_values", "n_visits", "``[P]`` int64 number of updates of each prompt.")
    ledger_at_visit = _part_attr("_ledger", "ledger_at_visit", "``[P]`` float64 C at each prompt's last update.")
    ledger = _part_attr("_ledger", "ledger", "C: cumulative per-step drift (accumulated mode), a float.")

    # ------------------------------------------------------------------------------------------
    # Lookup
    # ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def keys(self) -> List[str]:
        """Tracked keys in index order (a copy)."""
        return self._values.keys()

    def index_of(self, keys: Sequence[str]) -> torch.Tensor:
        """``[B]`` int64 tracker index of each key, −1 for an untracked key (never raises for those)."""
        return self._values.index_of(keys)

    def indices(self, keys: Sequence[str], fn: str = "ValueTracker") -> torch.Tensor:
        """``[B]`` int64 tracker index of each key; ``KeyError`` naming the first untracked key."""
        return self._values.indices(keys, fn)

    def values(self, keys: Sequence[str]) -> torch.Tensor:
        """``[B]`` float64 posterior means v̂ = α/(α+β). ``KeyError`` for an untracked key."""
        keys = check_keys(keys, "ValueTracker.values")
        return self.values_at(self.indices(keys, "ValueTracker.values"))

    def values_at(self, idx: torch.Tensor) -> torch.Tensor:
        """``[B]`` float64 v̂ at tracker indices ``idx`` (all ≥ 0)."""
        return self._values.values_at(idx)

    # ------------------------------------------------------------------------------------------
    # Forgetting factor ρ
    # ------------------------------------------------------------------------------------------

    def rho_from_distance(self, distance: torch.Tensor) -> torch.Tensor:
        """ρ per prompt from the distance D (any shape, finite, ≥ 0), float64, same shape.

        ``kl``: ρ = clip(2^(−D/d_half), ρ_min, ρ_max). ``constant``: ρ = rho_constant (D is still checked).
        """
        return rho_from_distance(distance, rho_type=self.rho_type, rho_min=self.rho_min, rho_max=self.rho_max,
                                 d_half=self.d_half, rho_constant=self.rho_constant)

    def rho(self, keys: Sequence[str], logp_now: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """``[B]`` ρ for ``keys`` in the configured type and mode (call after the step's actor update).

        ``constant``: rho_constant. ``kl`` + ``exact``: from :meth:`exact_distance` (needs ``logp_now``).
        ``kl`` + ``accumulated``: from :meth:`accumulated_distance`.
        """
        keys = check_keys(keys, "ValueTracker.rho")
        if self.rho_type == "constant":
            self.indices(keys, "ValueTracker.rho")
            return torch.full((len(keys),), self.rho_constant, dtype=F64)
        if self.rho_mode == "exact":
            if logp_now is None:
                raise ValueError("ValueTracker.rho: rho_mode='exact' needs logp_now (stored rows re-scored now)")
            return self.rho_from_distance(self.exact_distance(keys, logp_now))
        return self.rho_from_distance(self.accumulated_distance(keys))

    # exact mode --------------------------------------------------------------------------------

    def remember(self, keys: Sequence[str], logp: torch.Tensor, response_mask: torch.Tensor,
                 rows: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """Store this step's rows (``logp``, ``response_mask`` ``[B, T]``, optional ``rows`` with leading dim B)
        and their **post-update** log-probs (exact mode, docs/algorithms.md §1.7 step 7); arguments as in
        :meth:`megatron_spo.algos.spo_rows.RowMemory.remember`. A key seen again replaces its previous row."""
        if self.rho_mode != "exact":
            raise ValueError("ValueTracker.remember is for rho_mode='exact'; accumulated mode stores no rows")
        self._rows.remember(keys, logp, response_mask, rows)

    def has_memory(self, keys: Sequence[str]) -> torch.Tensor:
        """``[B]`` bool: the key has a stored row (false on a first visit). ``KeyError`` if untracked."""
        return self._rows.has(keys)

    def stored_rows(self, keys: Sequence[str]) -> List[Optional[Dict[str, torch.Tensor]]]:
        """Per key the stored row dict (``rows`` given to :meth:`remember` plus ``"response_mask"``), or
        None on a first visit. The caller re-scores these with the current policy for :meth:`exact_distance`."""
        return self._rows.stored(keys)

    def exact_distance(self, keys: Sequence[str], logp_now: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """``[B]`` float64 D = masked mean over the stored response tokens of |ℓ_then − ℓ_now|.

        ``logp_now`` item i is the current policy's log-probs ``[T_i]`` of key i's stored row, or None for
        a key without one (D = 0); see :meth:`megatron_spo.algos.spo_rows.RowMemory.distance`.
        """
        out = self._rows.distance(keys, logp_now)
        self._last["distance_mean"] = float(out.mean())
        return out

    # accumulated mode ----------------------------------------------------------------------------

    def record_step_drift(self, drift: float) -> None:
        """Add one step's drift (mean |logπ_θ − logπ_old| over the step's valid tokens, ≥ 0) to the ledger."""
        self._ledger.record_step_drift(drift)

    def accumulated_distance(self, keys: Sequence[str]) -> torch.Tensor:
        """``[B]`` float64 D = C_now − C_last(x): drift accumulated since x's last update; 0 on a first visit."""
        keys = check_keys(keys, "ValueTracker.accumulated_distance")
        idx = self.indices(keys, "ValueTracker.accumulated_distance")
        d = self._ledger.distance(idx, self.n_visits[idx] > 0)
        self._last["distance_mean"] = float(d.mean())
        return d

    # ------------------------------------------------------------------------------------------
    # Update
    # ------------------------------------------------------------------------------------------

    def update(self, keys: Sequence[str], rewards: Any, rho: Any) -> None:
        """α ← ρ·α + r, β ← ρ·β + (1 − r), n_visits += 1 per key, float64 (docs/algorithms.md §1.8).

        Args:
            keys: ``B`` tracked prompt keys; a repeated key is updated once per occurrence, in order.
            rewards: ``[B]`` finite, in [0, 1] (fractional success allowed).
            rho: ``[B]`` finite, in (0, 1].
        Validation happens before any state changes, so a rejected batch leaves the tracker untouched.
        """
        keys = check_keys(keys, "ValueTracker.update")
        r, rho_t = check_rewards_and_rho(keys, rewards, rho)
        idx = self.indices(keys, "ValueTracker.update")
        self._values.update(keys, idx, r, rho_t)
        self._ledger.mark_visit(idx)
        self._last["rho_mean"] = float(rho_t.mean())
        self._last["batch"] = float(len(keys))

    # ------------------------------------------------------------------------------------------
    # Metrics and state
    # ------------------------------------------------------------------------------------------

    def metrics(self) -> Dict[str, float]:
        """Scalars for logging: tracked/visited counts, mean v̂, last update's mean ρ and mean D, ledger."""
        n = len(self)
        v = self.alpha / (self.alpha + self.beta) if n else torch.zeros(0, dtype=F64)
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
            "spo/stored_rows": float(len(self._rows)),
        }

    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors, lists, dicts, floats and str only: ``torch.load(..., weights_only=True)`` reads it."""
        mem_index, memory = self._rows.state()
        return {
            "format": _FORMAT,
            "config": self.config(),
            "keys": self.keys(),
            "alpha": self.alpha.clone(),
            "beta": self.beta.clone(),
            "n_visits": self.n_visits.clone(),
            "ledger_at_visit": self.ledger_at_visit.clone(),
            "ledger": self.ledger,
            "last": dict(self._last),
            "memory_index": mem_index,
            "memory": memory,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "ValueTracker":
        """A tracker with the saved config and state."""
        tracker = cls(**dict(state["config"]))
        tracker.load_state_dict(state)
        return tracker

    def load_state_dict(self, state: Mapping[str, Any], *, strict_config: bool = True) -> None:
        """Restore :meth:`state_dict` output. With ``strict_config`` a saved config field that differs from
        this tracker's raises ``ValueError`` naming it; otherwise this tracker's config is kept.
        Everything is checked before anything changes."""
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
        if len(set(keys)) != p:
            raise ValueError("tracker state has repeated keys")
        mem_index = state["memory_index"].tolist()
        if len(mem_index) != len(state["memory"]) or any(not 0 <= i < p for i in mem_index):
            raise ValueError("tracker state memory_index does not match its memory list or keys")
        self._values.set_state(keys, tensors["alpha"], tensors["beta"], tensors["n_visits"])
        self._ledger.set_state(tensors["ledger_at_visit"], state["ledger"])
        self._last = dict(state["last"])
        self._rows.set_state(mem_index, state["memory"])
