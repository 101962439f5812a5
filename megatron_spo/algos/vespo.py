"""VESPO policy loss: a gamma-shaped soft trust region on the sequence importance weight (docs/algorithms.md §3.1).

Registered as ``vespo``. Per sequence i (all tensors ``[B, T]`` over response tokens, m = mask):

1. δ_{i,t} = clamp(logp − old_logp, −20, 20); S_i = Σ_t m δ (the true product ratio in log space,
   no length normalisation).
2. With TIS on (``tis_cap`` set, ``rollout_logp`` given): S_i += Σ_t m · log min(π_old/π_rollout, C)
   (``tis_level="token"``) or S_i += min(Σ_t m · log(π_old/π_rollout), log C) (``"sequence"``); each
   per-token log-ratio clamped to ±20 first.
3. S_i ← clamp(S_i, −20, 20); W_i = exp(S_i), detached.
4. (k, λ) = (k_pos, λ_pos) if A_i ≥ 0 else (k_neg, λ_neg), λ floored at 1e-4.
5. φ_i = exp(λ + k·S_i − λ·W_i) = W^k e^{λ(1−W)}, detached, NaN/±Inf → 0. φ(1) = 1, peak at W = k/λ.
6. L_{i,t} = −φ_i · A_{i,t} · logp_{i,t}, aggregated with ``agg`` (default ``token-mean``).
   The gradient is −φ·A·∇logp (REINFORCE with a soft, sequence-level weight); the loss *value*
   is a surrogate (it depends on logp itself) and only its gradient is meaningful.

Defaults k_pos = 2, λ_pos = 3, k_neg = 3, λ_neg = 2 (code and every run script; the docstring values
2/1.5/4/2.5 upstream are stale). Peaks: W = 2/3 with φ ≈ 1.21 (A ≥ 0), W = 1.5 with φ ≈ 1.24 (A < 0).

Choices and deviations:
- **Sequence advantage = A at the first valid token** of each row. Upstream takes column 0, which is
  the same for right-padded responses whose first token is a model token, and wrong if column 0
  is padding or a masked token. When A varies along a sequence (e.g. SegPO), only the sign choice
  uses A_i; the loss uses the per-token A_{i,t}, as upstream.
- log W is S itself. Upstream takes log(max(W, 1e-8)), which differs only for S < −18.4, where
  φ < 1e-14 either way.
- TIS (rollout correction) is on iff ``tis_cap`` is set, as for ``ppo``/``gspo``; upstream feeds the
  already-truncated verl weights, which is ``tis_level="token"`` here. ``tis_cap=float('inf')``
  gives the untruncated π_old/π_rollout. ``tis_cap`` without ``rollout_logp`` is an error.
- Metrics are sums + counts: per-sequence ``vespo/phi_mean``, ``vespo/w_mean``, ``vespo/log_w_mean``,
  ``vespo/phi_pos_mean``, ``vespo/phi_neg_mean``, ``vespo/pos_frac``; maxima ``vespo/phi_max``,
  ``vespo/w_max``; token-level ``vespo/ratio_*`` and ``vespo/approx_kl_*`` as in PPO; with TIS
  ``vespo/seq_log_tis_mean``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_spo.algos.aggregation import add_mean_metric, aggregate, seq_metric
from megatron_spo.algos.losses import LOG_RATIO_CLAMP, check_policy_loss_args, drift_metrics, log_tis_ratio
from megatron_spo.algos.registry import register_loss
from megatron_spo.algos.types import LossOutput

LAMBDA_FLOOR = 1e-4
SEQ_LOG_W_CLAMP = 20.0


def vespo_log_phi(log_w: torch.Tensor, k, lam) -> torch.Tensor:
    """``log φ = λ + k·log W − λ·W`` with λ floored at 1e-4; ``k``, ``lam`` scalars or broadcastable tensors."""
    lam = torch.clamp(torch.as_tensor(lam, dtype=log_w.dtype, device=log_w.device), min=LAMBDA_FLOOR)
    return lam + k * log_w - lam * torch.exp(log_w)


def vespo_phi(w: torch.Tensor, k, lam) -> torch.Tensor:
    """``φ(W) = W^k · e^{λ(1−W)}`` for W > 0, evaluated in log space (same shape as ``w``)."""
    return torch.exp(vespo_log_phi(torch.log(w), k, lam))


def first_valid_value(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values[i, j_i]`` with j_i the first column where ``valid[i]`` is true (0 if none); ``[B]``."""
    first = valid.to(torch.uint8).argmax(dim=-1, keepdim=True)  # argmax returns the first maximum
    return values.gather(-1, first).squeeze(-1)


@register_loss("vespo")
def vespo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    agg: str = "token-mean", max_len: Optional[int] = None, rollout_logp: Optional[torch.Tensor] = None,
    k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0,
    tis_cap: Optional[float] = None, tis_level: str = "token",
) -> LossOutput:
    """VESPO loss (module docstring, steps 1–6). Shapes ``[B, T]``; returns ``LossOutput``.

    ``loss_sum`` is Σ over valid tokens of −φ_i·A_{i,t}·logp_{i,t} for ``token-mean`` (normaliser:
    valid tokens), or the per-sequence forms of the other ``agg`` modes.
    """
    for name, value in (("k_pos", k_pos), ("lambda_pos", lambda_pos), ("k_neg", k_neg), ("lambda_neg", lambda_neg)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0):
            raise ValueError(f"vespo: {name} must be a finite number >= 0, got {value!r}")
    x = check_policy_loss_args(
        "vespo", logp, old_logp, advantages, mask, agg, max_len, rollout_logp, tis_cap, tis_level
    )
    zero = torch.zeros((), dtype=x.logp.dtype, device=x.logp.device)

    with torch.no_grad():
        delta = torch.where(x.valid, (x.logp - x.old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), zero)
        seq_log_w = delta.sum(dim=-1)  # [B]
        seq_log_tis = None
        if tis_cap is not None:
            log_tis = log_tis_ratio(x.old_logp, x.rollout_logp, x.valid)
            if tis_level == "token":
                seq_log_tis = log_tis.clamp(max=math.log(tis_cap)).sum(dim=-1)
            else:
                seq_log_tis = log_tis.sum(dim=-1).clamp(max=math.log(tis_cap))
            seq_log_w = seq_log_w + seq_log_tis
        seq_log_w = seq_log_w.clamp(-SEQ_LOG_W_CLAMP, SEQ_LOG_W_CLAMP)

        seq_adv = first_valid_value(x.advantages, x.valid)
        positive = seq_adv >= 0
        k = torch.where(positive, torch.full_like(seq_log_w, k_pos), torch.full_like(seq_log_w, k_neg))
        lam = torch.where(positive, torch.full_like(seq_log_w, lambda_pos), torch.full_like(seq_log_w, lambda_neg))
        phi = torch.exp(vespo_log_phi(seq_log_w, k, lam))
        phi = torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)  # [B]

    loss_mat = -phi.unsqueeze(-1) * x.advantages * x.logp
    loss_sum, normaliser = aggregate(loss_mat, x.valid, agg, max_len)

    rows = x.valid.any(dim=-1)
    w = torch.exp(seq_log_w)
    metrics = drift_metrics("vespo", x.logp, x.old_logp, x.valid, x.rollout_logp)
    add_mean_metric(metrics, "vespo/phi_mean", seq_metric(phi, rows))
    add_mean_metric(metrics, "vespo/w_mean", seq_metric(w, rows))
    add_mean_metric(metrics, "vespo/log_w_mean", seq_metric(seq_log_w, rows))
    add_mean_metric(metrics, "vespo/phi_pos_mean", seq_metric(phi, rows & positive))
    add_mean_metric(metrics, "vespo/phi_neg_mean", seq_metric(phi, rows & ~positive))
    add_mean_metric(metrics, "vespo/pos_frac", seq_metric(positive.to(phi.dtype), rows))
    metrics["vespo/phi_max"] = torch.where(rows, phi, torch.zeros_like(phi)).max()
    metrics["vespo/w_max"] = torch.where(rows, w, torch.zeros_like(w)).max()
    if seq_log_tis is not None:
        add_mean_metric(metrics, "vespo/seq_log_tis_mean", seq_metric(seq_log_tis, rows))
    return LossOutput(loss_sum=loss_sum, normaliser=normaliser.detach(), metrics=metrics)
