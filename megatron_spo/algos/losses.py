"""Clipped policy losses: PPO-clip (clip-higher + dual-clip), GSPO, and truncated IS (TIS) weights.

Registered as ``ppo`` and ``gspo`` (``algo.loss.name``). Common signature (the Megatron actor relies
on it)::

    fn(logp, old_logp, advantages, mask, *, agg, max_len=None, rollout_logp=None, **loss_kwargs)
        -> LossOutput(loss_sum, normaliser, metrics)

All tensors are ``[B, T]`` over response tokens: ``logp`` = log π_θ (carries the grad), ``old_logp``
= log π_old recomputed by the trainer, ``advantages`` = A (broadcast per token), ``mask`` = 0/1
(tool-output and padding tokens are 0), ``rollout_logp`` = log π_rollout from the engine. Only
``logp`` gets a gradient; the rest are detached. ``loss_sum / normaliser`` is the loss of this
micro-batch; callers divide by the normaliser summed over the whole step (see ``aggregation.py``).
Keyword names match the config (``algo.loss``): ``clip_low``, ``clip_high``, ``dual_clip``,
``tis_cap``; for GSPO ``clip_low``/``clip_high`` take ``gspo_clip_low``/``gspo_clip_high``.

Choices and deviations (docs/algorithms.md §1.6, §4):
- PPO is verl's "vanilla" loss: ratio = exp(clamp(logp − old, −20, 20)),
  L = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)), and for A < 0 additionally min(L, −A·c).
  Defaults ε_low = 0.2, ε_high = 0.28, c = 10 (SPO's train.sh). ``dual_clip=None`` disables it.
- **TIS is multiplied into the per-token loss** (upstream verl ``rollout_correction``), not into the
  ratio before clipping (the VESPO fork). Reason: the PPO trust region stays a region of π_θ/π_old,
  which is what the clip is meant to bound; the mismatch weight only rescales each token's term.
  Weights w = min(π_old/π_rollout, C) are detached; ``level="sequence"`` uses the truncated product
  over the sequence. TIS is on iff ``tis_cap`` is set; ``tis_cap`` without ``rollout_logp`` is an
  error (a silent "no correction" would be a wrong number). Rejection-sampling variants are not
  implemented.
- GSPO follows verl ``compute_policy_loss_gspo``: per token s_{i,t} = sg[s_i]·π_θ/sg[π_θ] with
  log s_i = mean_t(logp − old) over the valid tokens; log s_{i,t} clamped ≤ 10; ε = 3e-4 / 4e-4;
  default aggregation ``seq-mean-token-mean``. With that aggregation and a per-sequence A, the value
  and the gradient equal those of the sequence objective max(−A·s_i, −A·clip(s_i)).
- Metrics are sums with ``/count`` (token-level, over valid tokens, whatever ``agg`` is), plus
  ``*_max`` maxima. ``approx_kl_k1``/``approx_kl_k3`` estimate KL(π_old‖π_θ); ``rollout/kl_*`` (when
  ``rollout_logp`` is given) estimate KL(π_rollout‖π_old).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from megatron_spo.algos.aggregation import (
    LossInputs,
    add_mean_metric,
    aggregate,
    check_agg_mode,
    check_loss_inputs,
    seq_metric,
    token_metric,
)
from megatron_spo.algos.kl import kl_k1, kl_k3
from megatron_spo.algos.registry import register_loss
from megatron_spo.algos.types import LossOutput

LOG_RATIO_CLAMP = 20.0  # verl's bound on a log-ratio before exp
GSPO_LOG_RATIO_MAX = 10.0  # verl's cap on log s_{i,t}
TIS_LEVELS = ("token", "sequence")


# ---------------------------------------------------------------------------------------------
# parameter checks
# ---------------------------------------------------------------------------------------------


def _check_clip(fn: str, clip_low: float, clip_high: float) -> None:
    if not 0.0 < clip_low < 1.0:
        raise ValueError(f"{fn}: clip_low must be in (0, 1), got {clip_low}")
    if not clip_high > 0.0:
        raise ValueError(f"{fn}: clip_high must be > 0, got {clip_high}")


def check_tis_args(fn: str, tis_cap: Optional[float], tis_level: str, rollout_logp: Optional[torch.Tensor]) -> None:
    if tis_level not in TIS_LEVELS:
        raise ValueError(f"{fn}: unknown tis_level {tis_level!r}; allowed: {list(TIS_LEVELS)}")
    if tis_cap is None:
        return
    if not tis_cap > 0.0:
        raise ValueError(f"{fn}: tis_cap must be > 0 (or None to disable TIS), got {tis_cap}")
    if rollout_logp is None:
        raise ValueError(f"{fn}: tis_cap={tis_cap} is set but rollout_logp is None; TIS needs the engine's log-probs")


def check_policy_loss_args(
    fn: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    agg: str,
    max_len: Optional[int],
    rollout_logp: Optional[torch.Tensor],
    tis_cap: Optional[float],
    tis_level: str,
) -> LossInputs:
    """The checks every registered loss runs on the common arguments, after its own parameter checks.

    TIS arguments first, then the aggregation mode, then the ``[B, T]`` tensors; returns the
    validated ``LossInputs`` (``fn`` names the loss in the error messages).
    """
    check_tis_args(fn, tis_cap, tis_level, rollout_logp)
    check_agg_mode(agg, max_len)
    return check_loss_inputs(fn, logp, old_logp, advantages, mask, rollout_logp)


# ---------------------------------------------------------------------------------------------
# TIS
# ---------------------------------------------------------------------------------------------


def log_tis_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-token ``clamp(log π_old − log π_rollout, ±20)``, 0 outside ``valid``; ``[B, T]``, detached."""
    diff = (old_logp.detach() - rollout_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.where(valid, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))


def _tis_weights_clean(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, valid: torch.Tensor, cap: float, level: str
) -> torch.Tensor:
    log_w = log_tis_ratio(old_logp, rollout_logp, valid)
    if level == "sequence":
        # The product over the sequence, in log space; the same ±20 bound before exp.
        log_w = log_w.sum(dim=-1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).expand_as(log_w)
    w = torch.exp(log_w.clamp(max=math.log(cap)))
    return torch.where(valid, w, torch.zeros((), dtype=w.dtype, device=w.device)).detach()


def tis_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 2.0,
    level: str = "token",
) -> torch.Tensor:
    """Truncated importance weights for the rollout/trainer mismatch.

    Args:
        old_logp: ``[B, T]`` log π_old (trainer's recomputed log-probs).
        rollout_logp: ``[B, T]`` log π_rollout (engine's log-probs of the same tokens).
        mask: ``[B, T]`` 0/1 valid tokens.
        cap: C > 0 (verl ``rollout_is_threshold``, default 2.0).
        level: ``"token"``: w_t = min(π_old/π_rollout, C); ``"sequence"``: w_i = min(Π_t π_old/π_rollout, C)
            broadcast to the sequence's tokens.

    Returns:
        ``[B, T]`` detached weights, 0 at masked positions. Log-ratios are clamped to ±20 before exp.
    """
    check_tis_args("tis_weights", cap, level, rollout_logp)
    zeros = torch.zeros_like(old_logp)
    x = check_loss_inputs(
        "tis_weights", old_logp, rollout_logp, zeros, mask, names=("old_logp", "rollout_logp", "unused")
    )
    return _tis_weights_clean(x.logp, x.old_logp, x.valid, cap, level)


# ---------------------------------------------------------------------------------------------
# metrics shared by the losses
# ---------------------------------------------------------------------------------------------


def drift_metrics(
    prefix: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    valid: torch.Tensor,
    rollout_logp: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Token-level ratio and approx-KL metrics (sums + counts), all detached.

    ``<prefix>/ratio_mean``, ``<prefix>/ratio_max``, ``<prefix>/approx_kl_k1``, ``<prefix>/approx_kl_k3``
    (KL(π_old‖π_θ)), and with ``rollout_logp`` also ``rollout/kl_k1``, ``rollout/kl_k3`` (KL(π_rollout‖π_old)).
    """
    lp, old = logp.detach(), old_logp.detach()
    ratio = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    metrics: Dict[str, torch.Tensor] = {}
    add_mean_metric(metrics, f"{prefix}/ratio_mean", token_metric(ratio, valid))
    metrics[f"{prefix}/ratio_max"] = torch.where(valid, ratio, zero).max()
    add_mean_metric(metrics, f"{prefix}/approx_kl_k1", token_metric(kl_k1(old, lp), valid))
    add_mean_metric(metrics, f"{prefix}/approx_kl_k3", token_metric(kl_k3(old, lp), valid))
    if rollout_logp is not None:
        ro = rollout_logp.detach()
        add_mean_metric(metrics, "rollout/kl_k1", token_metric(kl_k1(ro, old), valid))
        add_mean_metric(metrics, "rollout/kl_k3", token_metric(kl_k3(ro, old), valid))
    return metrics


def _apply_tis(
    loss_mat: torch.Tensor, x: LossInputs, tis_cap: Optional[float], tis_level: str, metrics: Dict[str, torch.Tensor]
) -> torch.Tensor:
    """Multiply the per-token loss by the detached TIS weights (if ``tis_cap`` is set) and log them."""
    if tis_cap is None:
        return loss_mat
    w = _tis_weights_clean(x.old_logp, x.rollout_logp, x.valid, tis_cap, tis_level)
    add_mean_metric(metrics, "tis/weight_mean", token_metric(w, x.valid))
    add_mean_metric(metrics, "tis/capped_frac", token_metric((w >= tis_cap).to(w.dtype), x.valid))
    return loss_mat * w


def _clipped_surrogate(
    adv: torch.Tensor, ratio: torch.Tensor, clip_low: float, clip_high: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``max(−A·r, −A·clip(r, 1−clip_low, 1+clip_high))`` and where the clipped branch is the active one."""
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(loss_unclipped, loss_clipped), loss_clipped > loss_unclipped


# ---------------------------------------------------------------------------------------------
# PPO-clip
# ---------------------------------------------------------------------------------------------


@register_loss("ppo")
def ppo_clip_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    agg: str = "token-mean", max_len: Optional[int] = None, rollout_logp: Optional[torch.Tensor] = None,
    clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: Optional[float] = 10.0,
    tis_cap: Optional[float] = None, tis_level: str = "token",
) -> LossOutput:
    """PPO-clip with clip-higher and dual-clip (verl "vanilla"), per token, then ``aggregate``.

    ``L_t = max(−A_t r_t, −A_t clip(r_t, 1−clip_low, 1+clip_high))``; for A_t < 0 then
    ``min(L_t, −A_t·dual_clip)``; times the TIS weight w_t when ``tis_cap`` is set.
    ``r_t = exp(clamp(logp − old_logp, ±20))``.

    Returns:
        ``LossOutput``: ``loss_sum`` per ``agg`` (token-mean: Σ m·L over tokens; divide by the
        global valid-token count). Metrics: ``ppo/clip_frac`` (tokens whose clipped branch is the
        active one), ``ppo/dual_clip_frac`` (tokens capped at −A·c), ``ppo/ratio_mean``,
        ``ppo/ratio_max``, ``ppo/approx_kl_k1``, ``ppo/approx_kl_k3``, and TIS / rollout metrics.
    """
    _check_clip("ppo", clip_low, clip_high)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"ppo: dual_clip must be > 1 (or None to disable), got {dual_clip}")
    x = check_policy_loss_args(
        "ppo", logp, old_logp, advantages, mask, agg, max_len, rollout_logp, tis_cap, tis_level
    )
    adv = x.advantages

    ratio = torch.exp((x.logp - x.old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    loss_mat, clip_active = _clipped_surrogate(adv, ratio, clip_low, clip_high)
    if dual_clip is not None:
        cap = -adv * dual_clip
        negative = adv < 0
        dual_active = negative & (loss_mat > cap)
        loss_mat = torch.where(negative, torch.minimum(loss_mat, cap), loss_mat)
    else:
        dual_active = torch.zeros_like(clip_active)

    metrics = drift_metrics("ppo", x.logp, x.old_logp, x.valid, x.rollout_logp)
    loss_mat = _apply_tis(loss_mat, x, tis_cap, tis_level, metrics)

    loss_sum, normaliser = aggregate(loss_mat, x.valid, agg, max_len)
    add_mean_metric(metrics, "ppo/clip_frac", token_metric(clip_active.to(ratio.dtype), x.valid))
    add_mean_metric(metrics, "ppo/dual_clip_frac", token_metric(dual_active.to(ratio.dtype), x.valid))
    return LossOutput(loss_sum=loss_sum, normaliser=normaliser.detach(), metrics=metrics)


# ---------------------------------------------------------------------------------------------
# GSPO
# ---------------------------------------------------------------------------------------------


def gspo_log_seq_ratio(logp: torch.Tensor, old_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``log s_i = Σ_t m (logp − old) / Σ_t m`` (length-normalised), ``[B]``; carries logp's grad."""
    diff = torch.where(valid, logp - old_logp.detach(), torch.zeros((), dtype=logp.dtype, device=logp.device))
    return diff.sum(dim=-1) / valid.sum(dim=-1).clamp_min(1).to(diff.dtype)


@register_loss("gspo")
def gspo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    agg: str = "seq-mean-token-mean", max_len: Optional[int] = None, rollout_logp: Optional[torch.Tensor] = None,
    clip_low: float = 3e-4, clip_high: float = 4e-4,
    tis_cap: Optional[float] = None, tis_level: str = "token",
) -> LossOutput:
    """GSPO-token: a sequence-level, length-normalised ratio with a per-token gradient path.

    ``s_{i,t} = exp(min(sg[log s_i] + logp_t − sg[logp_t], 10))`` (value s_i, d s_{i,t}/d logp_t = s_{i,t}),
    ``L_t = max(−A_t s_{i,t}, −A_t clip(s_{i,t}, 1−clip_low, 1+clip_high))``, times w_t with TIS.

    Returns:
        ``LossOutput``; with the default ``seq-mean-token-mean`` the normaliser counts sequences.
        Metrics: ``gspo/clip_frac`` (token level), ``gspo/seq_ratio_mean`` (per sequence),
        ``gspo/seq_ratio_max``, ``gspo/ratio_mean``…``gspo/approx_kl_k3`` (token level, as PPO).
    """
    _check_clip("gspo", clip_low, clip_high)
    x = check_policy_loss_args(
        "gspo", logp, old_logp, advantages, mask, agg, max_len, rollout_logp, tis_cap, tis_level
    )
    adv = x.advantages

    log_s = gspo_log_seq_ratio(x.logp, x.old_logp, x.valid).detach()  # [B]
    log_s_tok = (x.logp - x.logp.detach() + log_s.unsqueeze(-1)).clamp(max=GSPO_LOG_RATIO_MAX)
    s_tok = torch.exp(log_s_tok)
    loss_mat, clip_active = _clipped_surrogate(adv, s_tok, clip_low, clip_high)

    metrics = drift_metrics("gspo", x.logp, x.old_logp, x.valid, x.rollout_logp)
    loss_mat = _apply_tis(loss_mat, x, tis_cap, tis_level, metrics)

    loss_sum, normaliser = aggregate(loss_mat, x.valid, agg, max_len)
    rows = x.valid.any(dim=-1)
    s_seq = torch.exp(log_s.clamp(max=GSPO_LOG_RATIO_MAX))
    add_mean_metric(metrics, "gspo/clip_frac", token_metric(clip_active.to(s_tok.dtype), x.valid))
    add_mean_metric(metrics, "gspo/seq_ratio_mean", seq_metric(s_seq, rows))
    metrics["gspo/seq_ratio_max"] = torch.where(rows, s_seq, torch.zeros_like(s_seq)).max().detach()
    return LossOutput(loss_sum=loss_sum, normaliser=normaliser.detach(), metrics=metrics)
