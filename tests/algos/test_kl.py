"""k1 / k3 KL estimators and the KL / entropy loss terms (megatron_spo/algos/kl.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_spo.algos.aggregation import finalize_metrics
from megatron_spo.algos.kl import entropy_bonus_loss, kl_k1, kl_k3, kl_penalty_loss, kl_per_token


def test_k1_k3_golden_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.2]], dtype=torch.float64))
    ref = torch.log(torch.tensor([[0.25, 0.2]], dtype=torch.float64))
    # k1 = log(0.5/0.25) = log 2 ; equal probabilities -> 0
    np.testing.assert_allclose(kl_k1(logp, ref).numpy(), [[math.log(2.0), 0.0]], rtol=1e-14)
    # k3: Δ = log(0.25/0.5) = −log 2 -> e^Δ − Δ − 1 = 0.5 + log 2 − 1 = 0.193147...
    np.testing.assert_allclose(kl_k3(logp, ref).numpy(), [[0.5 + math.log(2.0) - 1.0, 0.0]], rtol=1e-12, atol=1e-15)
    assert kl_per_token(logp, ref, "k1").equal(kl_k1(logp, ref))
    assert kl_per_token(logp, ref, "k3").equal(kl_k3(logp, ref))


@settings(max_examples=40, deadline=None)
@given(v=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_expectation_under_policy_is_exact_kl(v, seed):
    # For y ~ π over a categorical of size v: E[k1] = E[k3] = KL(π‖π_ref) exactly.
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(v))
    q = rng.dirichlet(np.ones(v))
    p, q = np.clip(p, 1e-6, None), np.clip(q, 1e-6, None)
    p, q = p / p.sum(), q / q.sum()
    kl_ref = float(np.sum(p * np.log(p / q)))
    lp, lq = torch.tensor(np.log(p))[None], torch.tensor(np.log(q))[None]
    k3 = kl_k3(lp, lq)[0].numpy()
    if np.all(np.abs(np.log(q / p)) < 20) and np.all(k3 < 10):  # clamps inactive
        assert float(np.sum(p * k3)) == pytest.approx(kl_ref, rel=1e-9, abs=1e-12)
    assert float(np.sum(p * kl_k1(lp, lq)[0].numpy())) == pytest.approx(kl_ref, rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(a=st.floats(-30, 0, allow_nan=False), b=st.floats(-30, 0, allow_nan=False))
def test_k3_non_negative_and_zero_iff_equal(a, b):
    v = kl_k3(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)).item()
    assert 0.0 <= v <= 10.0
    if a == b:
        assert v == 0.0


def test_k3_clamps_like_verl():
    logp = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([30.0, -5.0], dtype=torch.float64)
    k3 = kl_k3(logp, ref)
    # Δ = 30 -> clamped to 20 -> e^20 − 21 -> clamped to 10 ; Δ = −5 -> e^−5 + 5 − 1
    np.testing.assert_allclose(k3.detach().numpy(), [10.0, math.exp(-5) + 4.0], rtol=1e-12)
    k3.sum().backward()
    # d k3 / d logp = 1 − e^Δ ; the clamped token has zero gradient
    np.testing.assert_allclose(logp.grad.numpy(), [0.0, 1.0 - math.exp(-5)], rtol=1e-12)


def test_estimator_shape_errors():
    with pytest.raises(ValueError, match=r"kl_k3: ref_logp has shape \(2,\) but logp has shape \(3,\)"):
        kl_k3(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k2'.*k1.*k3"):
        kl_per_token(torch.zeros(1), torch.zeros(1), "k2")


def test_kl_penalty_loss_golden_and_grad():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9]], dtype=torch.float64)).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.4, 0.1]], dtype=torch.float64))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = kl_penalty_loss(logp, ref, mask, coef=0.1, estimator="k3")
    k3 = [0.5 + math.log(2.0) - 1.0, 2.0 - math.log(2.0) - 1.0]  # Δ = −log 2, +log 2
    assert out.loss_sum.item() == pytest.approx(0.1 * sum(k3), rel=1e-12)
    assert out.normaliser.item() == 2
    assert finalize_metrics(out.metrics)["kl/k3"] == pytest.approx(sum(k3) / 2)
    out.loss_sum.backward()
    np.testing.assert_allclose(logp.grad.numpy(), [[0.1 * (1 - 0.5), 0.1 * (1 - 2.0), 0.0]], rtol=1e-12)
    k1 = kl_penalty_loss(logp, ref, mask, coef=1.0, estimator="k1", agg="seq-mean-token-mean")
    assert k1.loss_sum.item() == pytest.approx((math.log(2.0) + math.log(0.5)) / 2, abs=1e-12)
    assert k1.normaliser.item() == 1


def test_kl_penalty_loss_errors():
    z, m = torch.zeros(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match=r"kl_penalty_loss: ref_logp has shape \(1, 3\)"):
        kl_penalty_loss(z, torch.zeros(1, 3), m, coef=0.1)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty_loss(z, z, m, coef=0.1, estimator="k2")
    with pytest.raises(ValueError, match="coef must be >= 0"):
        kl_penalty_loss(z, z, m, coef=-1.0)
    with pytest.raises(ValueError, match="no valid token"):
        kl_penalty_loss(z, z, torch.zeros(1, 2), coef=0.1)
    with pytest.raises(ValueError, match="unknown loss aggregation mode"):
        kl_penalty_loss(z, z, m, coef=0.1, agg="sum")


def test_entropy_bonus_loss():
    ent = torch.tensor([[1.0, 2.0, 5.0]], requires_grad=True)
    out = entropy_bonus_loss(ent, torch.tensor([[1.0, 1.0, 0.0]]), coef=0.01)
    assert out.loss_sum.item() == pytest.approx(-0.03)
    assert out.normaliser.item() == 2
    assert finalize_metrics(out.metrics)["entropy"] == pytest.approx(1.5)
    out.loss_sum.backward()
    np.testing.assert_allclose(ent.grad.numpy(), [[-0.01, -0.01, 0.0]], rtol=1e-6)  # descent raises H
    with pytest.raises(ValueError, match=r"entropy_bonus_loss: mask has shape \(1, 2\) but entropy has shape \(1, 3\)"):
        entropy_bonus_loss(ent, torch.ones(1, 2), coef=0.01)
