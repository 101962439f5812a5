"""VESPO loss (megatron_spo/algos/vespo.py) against hand values and an independent numpy reference.

Formulas: docs/algorithms.md §3.1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_spo.algos.aggregation import finalize_metrics
from megatron_spo.algos.vespo import first_valid_value, vespo_loss, vespo_phi

DEFAULTS = dict(k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0)


def np_phi(w, k, lam):
    return w**k * np.exp(lam * (1.0 - w))


def np_vespo(logp, old, adv, mask, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0, ro=None, cap=None):
    """Reference: per-row loops; returns (token-mean loss_sum, normaliser, phi per row)."""
    b, t = logp.shape
    total, norm, phis = 0.0, 0.0, []
    for i in range(b):
        cols = [j for j in range(t) if mask[i, j]]
        s = sum(min(max(logp[i, j] - old[i, j], -20.0), 20.0) for j in cols)
        if ro is not None:
            s += sum(min(min(max(old[i, j] - ro[i, j], -20.0), 20.0), math.log(cap)) for j in cols)
        s = min(max(s, -20.0), 20.0)
        a_seq = adv[i, cols[0]] if cols else 0.0
        k, lam = (k_pos, lambda_pos) if a_seq >= 0 else (k_neg, lambda_neg)
        lam = max(lam, 1e-4)
        phi = np_phi(math.exp(s), k, lam)
        phi = 0.0 if not math.isfinite(phi) else phi
        phis.append(phi)
        for j in cols:
            total += -phi * adv[i, j] * logp[i, j]
            norm += 1
    return total, norm, np.array(phis)


# ----------------------------------------------------------------------------- φ


@pytest.mark.parametrize("k,lam", [(2.0, 3.0), (3.0, 2.0), (0.5, 7.0), (4.0, 2.5)])
def test_phi_is_one_at_w_one(k, lam):
    assert vespo_phi(torch.tensor(1.0, dtype=torch.float64), k, lam).item() == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("k,lam,spec_peak", [(2.0, 3.0, 1.21), (3.0, 2.0, 1.24)])
def test_phi_peak_at_k_over_lambda_with_spec_values(k, lam, spec_peak):
    w_star = k / lam
    w = torch.tensor(w_star, dtype=torch.float64, requires_grad=True)
    phi = vespo_phi(w, k, lam)
    phi.backward()
    assert abs(w.grad.item()) < 1e-12  # φ'(k/λ) = 0
    # closed form: (k/λ)^k e^{λ − k} ≈ 1.2081 and 1.2416
    assert phi.item() == pytest.approx((k / lam) ** k * math.exp(lam - k), rel=1e-12)
    assert phi.item() == pytest.approx(spec_peak, abs=0.005)
    for delta in (1e-3, 0.05, 0.3):
        for other in (w_star - delta, w_star + delta):
            assert phi.item() > vespo_phi(torch.tensor(other, dtype=torch.float64), k, lam).item()


@settings(max_examples=50, deadline=None)
@given(w=st.floats(1e-3, 50.0), k=st.floats(0.1, 6.0), lam=st.floats(0.1, 6.0))
def test_phi_matches_closed_form(w, k, lam):
    got = vespo_phi(torch.tensor(w, dtype=torch.float64), k, lam).item()
    assert got == pytest.approx(float(np_phi(w, k, lam)), rel=1e-10, abs=1e-300)


def test_lambda_floor():
    # λ = 0 is floored to 1e-4: φ(W) = W^k e^{1e-4 (1 − W)}
    w = torch.tensor(3.0, dtype=torch.float64)
    assert vespo_phi(w, 2.0, 0.0).item() == pytest.approx(9.0 * math.exp(1e-4 * (1 - 3.0)), rel=1e-12)


# ----------------------------------------------------------------------------- loss golden


def test_loss_golden_by_hand():
    # row 0: A = +1, two tokens with logp − old = log 0.8 and log 0.5 -> W = 0.4, (k, λ) = (2, 3)
    # row 1: A = −0.5, one token with logp − old = log 2 -> W = 2, (k, λ) = (3, 2)
    old = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=torch.float64)
    logp = (old + torch.log(torch.tensor([[0.8, 0.5], [2.0, 1.0]], dtype=torch.float64))).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0], [-0.5, -0.5]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.float64)
    out = vespo_loss(logp, old, adv, mask)
    phi0 = 0.4**2 * math.exp(3 * 0.6)  # 0.96801...
    phi1 = 2.0**3 * math.exp(2 * -1.0)  # 1.08268...
    lp = logp.detach().numpy()
    expected = -phi0 * 1.0 * (lp[0, 0] + lp[0, 1]) - phi1 * (-0.5) * lp[1, 0]
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-12)
    assert out.normaliser.item() == 3
    out.loss_sum.backward()
    # the gradient is −φ·A per valid token (φ detached: no gradient through W)
    np.testing.assert_allclose(logp.grad.numpy(), [[-phi0, -phi0], [0.5 * phi1, 0.0]], rtol=1e-12)
    m = finalize_metrics(out.metrics)
    assert m["vespo/phi_mean"] == pytest.approx((phi0 + phi1) / 2)
    assert m["vespo/phi_pos_mean"] == pytest.approx(phi0)
    assert m["vespo/phi_neg_mean"] == pytest.approx(phi1)
    assert m["vespo/w_mean"] == pytest.approx((0.4 + 2.0) / 2)
    assert m["vespo/w_max"] == pytest.approx(2.0)
    assert m["vespo/pos_frac"] == pytest.approx(0.5)


@settings(max_examples=50, deadline=None)
@given(
    b=st.integers(1, 5), t=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
    drift=st.sampled_from([0.05, 0.5, 3.0, 30.0]), use_tis=st.booleans(), cap=st.sampled_from([1.5, 2.0, 1e9]),
)
def test_matches_numpy_reference(b, t, seed, drift, use_tis, cap):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 4
    logp = (old + torch.randn(b, t, generator=g, dtype=torch.float64) * drift).requires_grad_(True)
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).clone()
    mask = (torch.rand(b, t, generator=g) < 0.8).double()
    mask[0, -1] = 1.0
    ro = old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.5 if use_tis else None
    kw = dict(rollout_logp=ro, tis_cap=cap) if use_tis else {}
    out = vespo_loss(logp, old, adv, mask, **kw)
    ref_sum, ref_norm, phis = np_vespo(
        logp.detach().numpy(), old.numpy(), adv.numpy(), mask.numpy() > 0,
        ro=None if ro is None else ro.numpy(), cap=cap,
    )
    assert out.loss_sum.item() == pytest.approx(ref_sum, rel=1e-9, abs=1e-12)
    assert out.normaliser.item() == ref_norm
    out.loss_sum.backward()
    expected_grad = -phis[:, None] * adv.numpy() * mask.numpy()
    np.testing.assert_allclose(logp.grad.numpy(), expected_grad, rtol=1e-9, atol=1e-300)


# ----------------------------------------------------------------------------- kernel choice, clamps, NaN policy


def test_sign_taken_from_first_valid_token():
    # column 0 is masked (e.g. a tool token) and holds a positive A; the first valid token says A < 0
    adv = torch.tensor([[0.7, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1]], dtype=torch.float64)
    assert first_valid_value(adv, mask.bool()).item() == -1.0
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[0.0, math.log(1.5), 0.0]], dtype=torch.float64, requires_grad=True)  # W = 1.5
    out = vespo_loss(logp, old, adv, mask)
    out.loss_sum.backward()
    phi_neg = 1.5**3 * math.exp(2 * -0.5)  # (k, λ) = (3, 2), the A < 0 peak ≈ 1.2416
    np.testing.assert_allclose(logp.grad.numpy(), [[0.0, phi_neg, phi_neg]], rtol=1e-12)
    assert finalize_metrics(out.metrics)["vespo/phi_neg_mean"] == pytest.approx(phi_neg)


def test_zero_advantage_uses_positive_kernel():
    old = torch.zeros(1, 1, dtype=torch.float64)
    logp = torch.tensor([[math.log(2 / 3)]], dtype=torch.float64)
    out = vespo_loss(logp, old, torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1))
    m = finalize_metrics(out.metrics)
    assert m["vespo/pos_frac"] == 1.0
    assert m["vespo/phi_mean"] == pytest.approx((2 / 3) ** 2 * math.exp(1.0))


def test_sequence_log_weight_clamped_to_pm_20():
    old = torch.zeros(2, 4, dtype=torch.float64)
    logp = torch.tensor([[10.0] * 4, [-10.0] * 4], dtype=torch.float64)  # S = ±40 -> ±20
    adv = torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=torch.float64)
    out = vespo_loss(logp, old, adv, torch.ones(2, 4))
    m = finalize_metrics(out.metrics)
    assert m["vespo/log_w_mean"] == pytest.approx(0.0)  # (20 + −20)/2
    assert m["vespo/w_max"] == pytest.approx(math.exp(20.0))
    # row 0: φ = exp(3 + 40 − 3e^20) underflows to exactly 0; row 1: φ = exp(2 − 60 − 2e^−20)
    assert m["vespo/phi_pos_mean"] == 0.0
    assert m["vespo/phi_neg_mean"] == pytest.approx(math.exp(2.0 - 60.0 - 2.0 * math.exp(-20.0)), rel=1e-12)


def test_non_finite_phi_is_mapped_to_zero():
    # k = 1000 with S = 1: log φ = 3 + 1000 − 3e ≈ 995 -> exp overflows to Inf -> 0
    old = torch.zeros(1, 1, dtype=torch.float64)
    logp = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    out = vespo_loss(logp, old, torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1), k_pos=1000.0)
    out.loss_sum.backward()
    assert out.loss_sum.item() == 0.0 and logp.grad.item() == 0.0
    assert finalize_metrics(out.metrics)["vespo/phi_mean"] == 0.0


def test_rollout_correction_in_log_space():
    old = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    ro = torch.log(torch.tensor([[0.25, 0.125]], dtype=torch.float64))  # τ = 2, 4
    logp = old.clone()  # W from the policy drift alone = 1
    adv = torch.ones(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2)
    phi = lambda w: np_phi(w, 2.0, 3.0)  # noqa: E731
    cases = [
        (dict(), phi(1.0)),  # TIS off: rollout_logp unused
        (dict(rollout_logp=ro), phi(1.0)),
        (dict(rollout_logp=ro, tis_cap=float("inf")), phi(8.0)),  # τ product 2·4
        (dict(rollout_logp=ro, tis_cap=3.0), phi(2.0 * 3.0)),  # token truncation: min(2,3)·min(4,3)
        (dict(rollout_logp=ro, tis_cap=3.0, tis_level="sequence"), phi(3.0)),  # min(8, 3)
    ]
    for kw, phi_ref in cases:
        out = vespo_loss(logp, old, adv, mask, **kw)
        assert finalize_metrics(out.metrics)["vespo/phi_mean"] == pytest.approx(phi_ref, rel=1e-12), kw
    out = vespo_loss(logp, old, adv, mask, rollout_logp=ro, tis_cap=float("inf"))
    assert finalize_metrics(out.metrics)["vespo/seq_log_tis_mean"] == pytest.approx(math.log(8.0))


def test_bad_kernel_parameters_and_tis_without_rollout():
    z, m = torch.zeros(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match="k_neg must be a finite number >= 0"):
        vespo_loss(z, z, z, m, k_neg=-1.0)
    with pytest.raises(ValueError, match="lambda_pos"):
        vespo_loss(z, z, z, m, lambda_pos=float("nan"))
    with pytest.raises(ValueError, match="rollout_logp is None"):
        vespo_loss(z, z, z, m, tis_cap=2.0)


def test_other_aggregations():
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], dtype=torch.float64)
    adv = torch.tensor([[1.0] * 3, [2.0] * 3], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    _, _, phis = np_vespo(logp.numpy(), old.numpy(), adv.numpy(), mask.numpy() > 0)
    row = [-phis[0] * 1.0 * (-3.0), -phis[1] * 2.0 * (-1.5)]
    out = vespo_loss(logp, old, adv, mask, agg="seq-mean-token-mean")
    assert out.loss_sum.item() == pytest.approx(row[0] / 2 + row[1] / 3, rel=1e-12)
    assert out.normaliser.item() == 2
    out = vespo_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm", max_len=8)
    assert out.loss_sum.item() == pytest.approx((row[0] + row[1]) / 8, rel=1e-12)
