"""Per-token KL estimators (k1, k3) and the optional KL / entropy loss terms.

With samples y_t ~ π (the policy being trained) and Δ_t = log π_ref(y_t) − log π(y_t):

- ``k1 = log π − log π_ref = −Δ``: unbiased for KL(π‖π_ref) but can be negative per token (verl "kl").
- ``k3 = e^Δ − Δ − 1 ≥ 0``: unbiased and low-variance (Schulman's k3, verl "low_var_kl").

Choices (none deviates from verl; listed so the caller knows what the clamps do):
- k3 follows verl's ``low_var_kl`` guards: Δ is clamped to [−20, 20] before ``exp`` (no overflow),
  and the result is clamped to [−10, 10] (in practice ≤ 10, since k3 ≥ 0). Both clamps cut the
  gradient where they bite, which is the intended safety valve against a single runaway token.
- k1 is not clamped (it is linear in the log-probs and cannot overflow).
- Entropy itself is computed by the Megatron actor from vocab-parallel logits; here is only the
  loss term built from it (:func:`entropy_bonus_loss`).

The same estimators give the "approx KL" metrics of the PPO loss: ``kl_k1(old_logp, logp)`` and
``kl_k3(old_logp, logp)`` estimate KL(π_old‖π_θ) from samples of π_old.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_spo.algos.aggregation import (
    add_mean_metric,
    aggregate,
    check_agg_mode,
    check_loss_inputs,
    token_metric,
)
from megatron_spo.algos.types import LossOutput

KL_ESTIMATORS = ("k1", "k3")

_LOG_CLAMP = 20.0  # verl's bound on a log-ratio before exp
_K3_CLAMP = 10.0  # verl's bound on a per-token k3 value


def _check_pair(name: str, logp: torch.Tensor, ref_logp: torch.Tensor) -> None:
    if logp.shape != ref_logp.shape:
        raise ValueError(f"{name}: ref_logp has shape {tuple(ref_logp.shape)} but logp has shape {tuple(logp.shape)}")


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``logp − ref_logp``, per token, same shape as the inputs (e.g. ``[B, T]``), nats."""
    _check_pair("kl_k1", logp, ref_logp)
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``exp(Δ) − Δ − 1`` with ``Δ = clamp(ref_logp − logp, ±20)``, clamped to [−10, 10]; per token, nats."""
    _check_pair("kl_k3", logp, ref_logp)
    delta = (ref_logp - logp).clamp(-_LOG_CLAMP, _LOG_CLAMP)
    return (torch.exp(delta) - delta - 1.0).clamp(-_K3_CLAMP, _K3_CLAMP)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Dispatch on ``estimator`` ("k1" or "k3")."""
    if estimator == "k1":
        return kl_k1(logp, ref_logp)
    if estimator == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {list(KL_ESTIMATORS)}")


def kl_penalty_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    estimator: str = "k3",
    agg: str = "token-mean",
    max_len: Optional[int] = None,
) -> LossOutput:
    """KL-to-reference loss term ``coef · KL_est(π_θ‖π_ref)``, aggregated like the policy loss.

    Args:
        logp: ``[B, T]`` log-probs of the policy (carries grad).
        ref_logp: ``[B, T]`` log-probs of the reference model (constant, detached here).
        mask: ``[B, T]`` 0/1 valid tokens.
        coef: ≥ 0, the weight β of the term.
        estimator: "k1" or "k3".
        agg, max_len: as in :func:`megatron_spo.algos.aggregation.aggregate`.

    Returns:
        ``LossOutput`` whose ``loss_sum`` is ``coef · Σ(aggregated KL)`` and whose normaliser counts
        the same units as the policy loss with the same ``agg`` (so both can share one global
        normaliser). Metrics: ``kl/<estimator>`` (token mean of the un-weighted estimate).
    """
    check_agg_mode(agg, max_len)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {list(KL_ESTIMATORS)}")
    if not coef >= 0.0:
        raise ValueError(f"kl_penalty_loss: coef must be >= 0, got {coef}")
    # ref_logp plays the role of old_logp in the shared checks; advantages are not used.
    x = check_loss_inputs(
        "kl_penalty_loss", logp, ref_logp, torch.zeros_like(ref_logp), mask, names=("logp", "ref_logp", "advantages")
    )
    kl = kl_per_token(x.logp, x.old_logp, estimator)
    loss_sum, normaliser = aggregate(kl, x.valid, agg, max_len)
    metrics = {}
    add_mean_metric(metrics, f"kl/{estimator}", token_metric(kl, x.valid))
    return LossOutput(loss_sum=coef * loss_sum, normaliser=normaliser.detach(), metrics=metrics)


def entropy_bonus_loss(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    agg: str = "token-mean",
    max_len: Optional[int] = None,
) -> LossOutput:
    """Entropy term ``−coef · H`` to add to the loss (minimising it raises the entropy).

    Args:
        entropy: ``[B, T]`` per-token entropy of the policy in nats (carries grad), computed by the
            actor from (vocab-parallel) logits.
        mask: ``[B, T]`` 0/1 valid tokens.
        coef: ≥ 0.

    Returns:
        ``LossOutput`` with ``loss_sum = −coef · aggregated H`` and metric ``entropy`` (token mean).
    """
    check_agg_mode(agg, max_len)
    if not coef >= 0.0:
        raise ValueError(f"entropy_bonus_loss: coef must be >= 0, got {coef}")
    zeros = torch.zeros_like(entropy)
    x = check_loss_inputs("entropy_bonus_loss", entropy, zeros, zeros, mask, names=("entropy", "unused", "unused"))
    loss_sum, normaliser = aggregate(x.logp, x.valid, agg, max_len)
    metrics = {}
    add_mean_metric(metrics, "entropy", token_metric(x.logp, x.valid))
    return LossOutput(loss_sum=-coef * loss_sum, normaliser=normaliser.detach(), metrics=metrics)
