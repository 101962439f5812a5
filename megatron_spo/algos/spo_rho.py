"""SPO forgetting factor ρ from a distance D, and the accumulated-drift ledger (docs/algorithms.md §1.7).

ρ_raw = 2^(−D/d_half), ρ = clip(ρ_raw, ρ_min, ρ_max) for ``rho_type="kl"``; ``rho_type="constant"``
gives ``rho_constant`` for every prompt. A first visit has D = 0, so ρ = ρ_max (0.96 by default).

Deviations from the reference (verl-recipe ``spo/spo_ray_trainer.py``, ``_get_spo_rho``) and choices:

1. ``rho_max`` and ``d_half`` are constructor arguments (the reference hard-codes 0.96 and 0.06, which are
   the defaults) so that config ``algo.spo.*`` can reach them.
2. **Accumulated distance** (``rho_mode="accumulated"``, **a deviation**, zero extra forward passes;
   the reference's exact distance is in :mod:`megatron_spo.algos.spo_rows`): once per step the trainer
   reports a drift statistic it already has from the PPO update — the mean |logπ_θ − logπ_old| over
   the step's valid tokens, measured during the update — with :meth:`DriftLedger.record_step_drift`.
   The ledger keeps the running sum C of those drifts and each prompt's C at its last update; then
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
3. **Validation the reference does not do:** D finite and ≥ 0 and drifts finite and ≥ 0, each
   violation a ``ValueError`` naming the index and the value.

Units: D is in nats of log-probability per response token; ρ is a per-step multiplicative factor.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64
RHO_TYPES = ("kl", "constant")
RHO_MODES = ("exact", "accumulated")


def check_rho_config(rho_type: str, rho_mode: str, rho_min: float, rho_max: float, d_half: float,
                     rho_constant: float) -> None:
    """``ValueError`` naming the first invalid ρ setting (the tracker's constructor arguments)."""
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


def rho_from_distance(distance: torch.Tensor, *, rho_type: str, rho_min: float, rho_max: float, d_half: float,
                      rho_constant: float) -> torch.Tensor:
    """ρ per prompt from the distance D (any shape, finite, ≥ 0), float64, same shape.

    ``kl``: ρ = clip(2^(−D/d_half), ρ_min, ρ_max). ``constant``: ρ = rho_constant (D is still checked).
    """
    d = torch.as_tensor(distance).detach().to(device="cpu", dtype=F64)
    bad = (~(torch.isfinite(d) & (d >= 0))).flatten().nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"distance D[{i}] = {d.flatten()[i].item()}; must be finite and ≥ 0")
    if rho_type == "constant":
        return torch.full_like(d, rho_constant)
    return torch.exp2(-d / d_half).clamp(rho_min, rho_max)


class DriftLedger:
    """Running sum C of per-step drifts, and each prompt's C at its last update (``[P]`` float64)."""

    def __init__(self) -> None:
        self.ledger = 0.0  # C: cumulative per-step drift
        self.ledger_at_visit = torch.empty(0, dtype=F64)

    def grow(self, k: int) -> None:
        """Room for ``k`` newly tracked prompts (C_last = 0; unused until their first update)."""
        self.ledger_at_visit = torch.cat([self.ledger_at_visit, torch.zeros(k, dtype=F64)])

    def record_step_drift(self, drift: float) -> None:
        """Add one step's drift (mean |logπ_θ − logπ_old| over the step's valid tokens, ≥ 0) to C."""
        d = float(drift)
        if not (math.isfinite(d) and d >= 0):
            raise ValueError(f"record_step_drift: drift={d}; must be finite and ≥ 0")
        self.ledger += d

    def distance(self, idx: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
        """``[B]`` float64 D = C_now − C_last at indices ``idx``; 0 where ``visited`` ``[B]`` bool is false."""
        d = (self.ledger - self.ledger_at_visit[idx]).clamp_min(0.0)
        return torch.where(visited, d, torch.zeros_like(d))

    def mark_visit(self, idx: torch.Tensor) -> None:
        """C_last ← C_now at indices ``idx`` (called by every update, in every mode)."""
        self.ledger_at_visit[idx] = self.ledger

    def set_state(self, ledger_at_visit: torch.Tensor, ledger: float) -> None:
        """Replace the ledger with saved state (shape checked by the caller)."""
        self.ledger_at_visit = ledger_at_visit.to(F64).clone()
        self.ledger = float(ledger)
