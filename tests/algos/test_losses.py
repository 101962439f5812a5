"""PPO-clip (clip-higher, dual-clip), GSPO and TIS weights (megatron_spo/algos/losses.py).

Golden values come from hand computations or from the numpy references written here, which follow
the formulas of docs/algorithms.md (§1.6, §4) and share no code with the package.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from megatron_spo.algos import get_loss
from megatron_spo.algos.aggregation import AGG_MODES, finalize_metrics
from megatron_spo.algos.losses import gspo_loss, ppo_clip_loss, tis_weights
from megatron_spo.algos.vespo import vespo_loss

EPS_LOW, EPS_HIGH, C = 0.2, 0.28, 10.0


# ----------------------------------------------------------------------------- numpy references


def np_ppo_token_losses(logp, old, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH, c=C):
    r = np.exp(np.clip(logp - old, -20, 20))
    out = np.empty_like(r)
    for idx in np.ndindex(r.shape):
        a, ri = adv[idx], r[idx]
        # the surrogate max(−A r, −A clip(r)) written as the PPO min objective, negated
        obj = min(a * ri, a * min(max(ri, 1 - eps_low), 1 + eps_high))
        loss = -obj
        if c is not None and a < 0:
            loss = min(loss, -a * c)
        out[idx] = loss
    return out


def np_token_mean(loss, mask):
    return float((loss * mask).sum()), float(mask.sum())


# ----------------------------------------------------------------------------- registry


def test_registered_under_contract_names():
    assert get_loss("ppo") is ppo_clip_loss
    assert get_loss("gspo") is gspo_loss
    assert get_loss("vespo") is vespo_loss


# ----------------------------------------------------------------------------- PPO golden


def test_ppo_golden_by_hand():
    # ratios 1.5, 0.5, 0.5, 20, 30, 1.1 with advantages 1, 1, −1, −1, −2, 0.5
    ratios = torch.tensor([[1.5, 0.5, 0.5], [20.0, 30.0, 1.1]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, -2.0, 0.5]], dtype=torch.float64)
    old = torch.full_like(ratios, -1.0)
    logp = (old + ratios.log()).requires_grad_(True)
    mask = torch.ones_like(ratios)
    out = ppo_clip_loss(logp, old, adv, mask)
    # by hand:
    #  A=1,  r=1.5 : clipped at 1.28                      -> −1.28
    #  A=1,  r=0.5 : min(0.5, 0.8) = 0.5 (not clipped)    -> −0.5
    #  A=−1, r=0.5 : max(0.5, 0.8) = 0.8 (clipped)        ->  0.8
    #  A=−1, r=20  : max(20, 1.28) = 20, dual cap 1·10    -> 10
    #  A=−2, r=30  : max(60, 2.56) = 60, dual cap 2·10    -> 20  (= −A·c)
    #  A=.5, r=1.1 : inside                               -> −0.55
    expected = [-1.28, -0.5, 0.8, 10.0, 20.0, -0.55]
    assert out.loss_sum.item() == pytest.approx(sum(expected), abs=1e-12)
    assert out.normaliser.item() == 6
    m = finalize_metrics(out.metrics)
    assert m["ppo/clip_frac"] == pytest.approx(2 / 6)  # tokens 1 and 3 take the clipped branch
    assert m["ppo/dual_clip_frac"] == pytest.approx(2 / 6)  # tokens 4 and 5 are capped
    assert m["ppo/ratio_mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 20 + 30 + 1.1) / 6)
    assert m["ppo/ratio_max"] == pytest.approx(30.0)
    log_r = np.log([1.5, 0.5, 0.5, 20, 30, 1.1])
    assert m["ppo/approx_kl_k1"] == pytest.approx(float(np.mean(-log_r)))
    # k3 per token is clamped at 10 (verl low_var_kl): r = 20 and r = 30 give 16.0 and 25.6 -> 10
    assert m["ppo/approx_kl_k3"] == pytest.approx(float(np.mean(np.minimum(np.exp(log_r) - log_r - 1, 10.0))))
    # gradient: −A·r on unclipped tokens (d r / d logp = r), 0 on clipped or capped ones
    out.loss_sum.backward()
    np.testing.assert_allclose(logp.grad.numpy(), [[0.0, -0.5, 0.0], [0.0, 0.0, -0.55]], atol=1e-12)


def test_ppo_dual_clip_cap_is_minus_a_times_c_and_can_be_disabled():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.log(torch.tensor([[12.0, 50.0, 1e6]], dtype=torch.float64))
    adv = torch.tensor([[-0.7, -0.7, -0.7]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    for c in (3.0, 10.0):
        out = ppo_clip_loss(logp, old, adv, mask, dual_clip=c)
        assert out.loss_sum.item() == pytest.approx(3 * 0.7 * c)
    # None: no cap, the raw −A·r (ratio capped only by the log-ratio clamp at ±20)
    out = ppo_clip_loss(logp, old, adv, mask, dual_clip=None)
    assert out.loss_sum.item() == pytest.approx(0.7 * (12 + 50 + 1e6))
    assert finalize_metrics(out.metrics)["ppo/dual_clip_frac"] == 0.0


def test_ppo_log_ratio_clamped_at_20():
    out = ppo_clip_loss(
        torch.tensor([[30.0]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
        torch.tensor([[-1.0]], dtype=torch.float64), torch.ones(1, 1), dual_clip=None,
    )
    assert out.loss_sum.item() == pytest.approx(math.exp(20.0))


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 4), t=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
    eps_low=st.floats(0.05, 0.5), eps_high=st.floats(0.05, 0.5), c=st.one_of(st.none(), st.floats(1.5, 20)),
)
def test_ppo_matches_numpy_reference(b, t, seed, eps_low, eps_high, c):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(b, t, generator=g, dtype=torch.float64) * 1.5
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) < 0.7).double()
    assume(mask.sum() > 0)
    out = ppo_clip_loss(logp, old, adv, mask, clip_low=eps_low, clip_high=eps_high, dual_clip=c)
    ref = np_ppo_token_losses(logp.numpy(), old.numpy(), adv.numpy(), eps_low, eps_high, c)
    s, n = np_token_mean(ref, mask.numpy())
    assert out.loss_sum.item() == pytest.approx(s, rel=1e-9, abs=1e-9)
    assert out.normaliser.item() == n


# ----------------------------------------------------------------------------- PPO gradient property

_finite = dict(allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(
    log_r=st.floats(-3.0, 3.0, **_finite),
    a=st.floats(-5.0, 5.0, **_finite).filter(lambda v: abs(v) > 1e-3),
    old=st.floats(-5.0, 0.0, **_finite),
)
def test_ppo_gradient_zero_outside_trust_region_nonzero_inside(log_r, a, old):
    r = math.exp(log_r)
    margin = 1e-6  # stay off the exact kinks, where the subgradient is a convention
    for edge in (1 - EPS_LOW, 1 + EPS_HIGH, C):
        assume(abs(r - edge) > margin)
    logp = torch.tensor([[old + log_r]], dtype=torch.float64, requires_grad=True)
    out = ppo_clip_loss(logp, torch.tensor([[old]], dtype=torch.float64), torch.tensor([[a]], dtype=torch.float64),
                        torch.ones(1, 1))
    out.loss_sum.backward()
    grad = logp.grad.item()
    outside = (a > 0 and r > 1 + EPS_HIGH) or (a < 0 and r < 1 - EPS_LOW) or (a < 0 and r > C)
    if outside:
        assert grad == 0.0
    else:
        # inside (including the un-clipped side: A>0 with small r, A<0 with 1+ε_high < r < c)
        assert grad != 0.0
        assert grad == pytest.approx(-a * r, rel=1e-12)


# ----------------------------------------------------------------------------- micro-batch invariance


def _random_batch(g, b, t, dtype=torch.float64):
    old = -torch.rand(b, t, generator=g, dtype=dtype) * 3
    logp = old + torch.randn(b, t, generator=g, dtype=dtype) * 0.3
    adv = torch.randn(b, 1, generator=g, dtype=dtype).expand(b, t).clone()
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(dtype)
    return logp, old, adv, mask


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(2, 7), t=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
    cuts=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    name=st.sampled_from(["ppo", "gspo", "vespo"]),
    agg=st.sampled_from(AGG_MODES),
)
def test_microbatch_split_invariance_with_global_normaliser(b, t, seed, cuts, name, agg):
    g = torch.Generator().manual_seed(seed)
    logp, old, adv, mask = _random_batch(g, b, t)
    fn = get_loss(name)
    kw = dict(agg=agg, max_len=t + 3)

    whole_lp = logp.clone().requires_grad_(True)
    whole = fn(whole_lp, old, adv, mask, **kw)
    whole_loss = whole.loss_sum / whole.normaliser
    whole_loss.backward()

    # arbitrary row permutation, then split into consecutive chunks of the drawn sizes
    perm = torch.randperm(b, generator=g)
    split_lp = logp.clone().requires_grad_(True)
    chunks, start = [], 0
    for size in cuts + [b]:
        if start >= b:
            break
        chunks.append(perm[start:start + size])
        start += size
    parts = [fn(split_lp[idx], old[idx], adv[idx], mask[idx], **kw) for idx in chunks]
    total_norm = sum(p.normaliser for p in parts)
    split_loss = sum(p.loss_sum for p in parts) / total_norm
    split_loss.backward()

    assert total_norm.item() == whole.normaliser.item()
    assert split_loss.item() == pytest.approx(whole_loss.item(), abs=1e-6)
    torch.testing.assert_close(split_lp.grad, whole_lp.grad, atol=1e-6, rtol=0)


def test_token_mean_split_invariance_float32():
    g = torch.Generator().manual_seed(0)
    logp, old, adv, mask = _random_batch(g, 8, 16, dtype=torch.float32)
    whole = ppo_clip_loss(logp, old, adv, mask)
    parts = [ppo_clip_loss(logp[i:i + 3], old[i:i + 3], adv[i:i + 3], mask[i:i + 3]) for i in range(0, 8, 3)]
    split = sum(p.loss_sum for p in parts) / sum(p.normaliser for p in parts)
    assert split.item() == pytest.approx((whole.loss_sum / whole.normaliser).item(), abs=1e-6)


# ----------------------------------------------------------------------------- TIS


def test_tis_weights_token_and_sequence_golden():
    old = torch.log(torch.tensor([[0.5, 0.4, 0.9], [0.2, 0.3, 0.3]], dtype=torch.float64))
    ro = torch.log(torch.tensor([[0.1, 0.5, 0.3], [0.4, 0.3, 0.1]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    w = tis_weights(old, ro, mask, cap=2.0, level="token")
    # ratios 5, 0.8, 3 | 0.5, 1, (masked) -> min(·, 2)
    np.testing.assert_allclose(w.numpy(), [[2.0, 0.8, 2.0], [0.5, 1.0, 0.0]], rtol=1e-12)
    ws = tis_weights(old, ro, mask, cap=2.0, level="sequence")
    # products: 5·0.8·3 = 12 -> 2 ; 0.5·1 = 0.5
    np.testing.assert_allclose(ws.numpy(), [[2.0, 2.0, 2.0], [0.5, 0.5, 0.0]], rtol=1e-12)
    ws_big = tis_weights(old, ro, mask, cap=100.0, level="sequence")
    assert ws_big[0, 0].item() == pytest.approx(12.0)


def test_tis_weights_detached_and_validated():
    old = torch.zeros(1, 2, requires_grad=True)
    w = tis_weights(old, torch.zeros(1, 2), torch.ones(1, 2))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="tis_level"):
        tis_weights(old, torch.zeros(1, 2), torch.ones(1, 2), level="segment")
    with pytest.raises(ValueError, match=r"rollout_logp has shape \(1, 3\)"):
        tis_weights(old, torch.zeros(1, 3), torch.ones(1, 2))
    with pytest.raises(ValueError, match="tis_cap must be > 0"):
        tis_weights(old, torch.zeros(1, 2), torch.ones(1, 2), cap=0.0)


def test_ppo_tis_multiplies_the_per_token_loss():
    g = torch.Generator().manual_seed(3)
    logp, old, adv, mask = _random_batch(g, 4, 5)
    ro = old + torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.8
    base = np_ppo_token_losses(logp.numpy(), old.numpy(), adv.numpy())
    w_ref = np.minimum(np.exp(old.numpy() - ro.numpy()), 2.0)  # upstream verl: loss × min(π_old/π_ro, C)
    out = ppo_clip_loss(logp, old, adv, mask, rollout_logp=ro, tis_cap=2.0)
    assert out.loss_sum.item() == pytest.approx(float((base * w_ref * mask.numpy()).sum()), rel=1e-10)
    m = finalize_metrics(out.metrics)
    valid = mask.numpy() > 0
    assert m["tis/weight_mean"] == pytest.approx(float(w_ref[valid].mean()))
    assert m["tis/capped_frac"] == pytest.approx(float((w_ref[valid] >= 2.0).mean()))
    assert m["rollout/kl_k1"] == pytest.approx(float((ro.numpy() - old.numpy())[valid].mean()))
    # rollout_logp without tis_cap: no correction, same loss as without rollout_logp
    plain = ppo_clip_loss(logp, old, adv, mask, rollout_logp=ro)
    assert plain.loss_sum.item() == pytest.approx(float((base * mask.numpy()).sum()), rel=1e-10)
    assert "tis/weight_mean" not in plain.metrics and "rollout/kl_k3" in plain.metrics


def test_tis_cap_without_rollout_logp_is_an_error():
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="rollout_logp is None"):
        ppo_clip_loss(lp, lp, lp, torch.ones(1, 2), tis_cap=2.0)


# ----------------------------------------------------------------------------- GSPO


def _explicit_gspo(logp, old, adv_seq, mask, eps_low=3e-4, eps_high=4e-4):
    """Sequence-level GSPO written directly: mean over sequences of max(−A s_i, −A clip(s_i))."""
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    per_seq = torch.maximum(-adv_seq * s, -adv_seq * s.clamp(1 - eps_low, 1 + eps_high))
    return per_seq.sum(), s


def test_gspo_value_is_sequence_ratio():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.4, 0.9]], dtype=torch.float64))
    new = torch.log(torch.tensor([[0.25, 0.125, 0.9], [0.1, 0.4, 0.9]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    # s_0 = (0.5 · 0.25)^(1/2) = 0.353553..., s_1 = (0.5)^(1/3) = 0.793700...
    s_ref = [math.sqrt(0.5 * 0.25), 0.5 ** (1 / 3)]
    adv = torch.ones(2, 3, dtype=torch.float64)  # A > 0 and s < 1 − ε: the un-clipped branch, L_t = −s_i
    out = gspo_loss(new, old, adv, mask)
    assert out.normaliser.item() == 2  # seq-mean-token-mean default
    assert out.loss_sum.item() == pytest.approx(-(s_ref[0] + s_ref[1]), rel=1e-12)
    tok = gspo_loss(new, old, adv, mask, agg="token-mean")  # every token's value is its s_i
    assert tok.loss_sum.item() == pytest.approx(-(2 * s_ref[0] + 3 * s_ref[1]), rel=1e-12)
    m = finalize_metrics(out.metrics)
    assert m["gspo/seq_ratio_mean"] == pytest.approx(sum(s_ref) / 2)
    assert m["gspo/seq_ratio_max"] == pytest.approx(s_ref[1])
    assert m["gspo/clip_frac"] == 0.0


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 5), t=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-4, 1e-3, 0.1]),
)
def test_gspo_gradient_matches_autograd_of_explicit_formula(b, t, seed, scale):
    g = torch.Generator().manual_seed(seed)
    logp0, old, adv, mask = _random_batch(g, b, t)
    logp0 = old + torch.randn(b, t, generator=g, dtype=torch.float64) * scale  # some in, some out of ε
    lp_a = logp0.clone().requires_grad_(True)
    out = gspo_loss(lp_a, old, adv, mask)
    out.loss_sum.backward()
    lp_b = logp0.clone().requires_grad_(True)
    ref, s = _explicit_gspo(lp_b, old, adv[:, 0], mask)
    ref.backward()
    assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(lp_a.grad, lp_b.grad, rtol=1e-10, atol=1e-12)


def test_gspo_gradient_flows_per_token():
    # token-mean: d L / d logp_{i,t} = −A_i · s_i for every valid token of an un-clipped sequence
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.tensor([[-0.3, -0.1, 0.0], [0.2, 0.4, 0.6]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0] * 3, [-2.0] * 3], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    gspo_loss(logp, old, adv, mask, agg="token-mean").loss_sum.backward()
    s0, s1 = math.exp(-0.2), math.exp(0.4)  # s0 < 1−ε with A>0 and s1 > 1+ε with A<0: both un-clipped
    np.testing.assert_allclose(logp.grad.numpy(), [[-s0, -s0, 0.0], [2 * s1] * 3], rtol=1e-12)


def test_gspo_log_ratio_capped_at_10():
    logp = torch.full((1, 2), 12.0, dtype=torch.float64, requires_grad=True)
    out = gspo_loss(logp, torch.zeros(1, 2, dtype=torch.float64), -torch.ones(1, 2, dtype=torch.float64),
                    torch.ones(1, 2))
    assert out.loss_sum.item() == pytest.approx(math.exp(10.0))
    out.loss_sum.backward()
    assert (logp.grad == 0).all()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["ppo", "gspo", "vespo"])
def test_bad_input_errors(name):
    fn = get_loss(name)
    z, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=rf"{name}: old_logp has shape \(2, 2\) but logp has shape \(2, 3\)"):
        fn(z, torch.zeros(2, 2), z, m)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2\)"):
        fn(z, z, z, torch.ones(3, 2))
    with pytest.raises(ValueError, match="empty batch"):
        fn(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), torch.ones(0, 3))
    with pytest.raises(ValueError, match="no valid token"):
        fn(z, z, z, torch.zeros(2, 3))
    bad = z.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"logp has a non-finite value nan at valid token \[0, 1\]"):
        fn(bad, z, z, m)
    with pytest.raises(ValueError, match=r"advantages has a non-finite value nan"):
        fn(z, z, bad, m)
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'mean'.*token-mean"):
        fn(z, z, z, m, agg="mean")
    with pytest.raises(ValueError, match="max_len"):
        fn(z, z, z, m, agg="seq-mean-token-sum-norm")
    with pytest.raises(TypeError):
        fn(z, z, z, m, not_a_parameter=1.0)


def test_bad_clip_parameters():
    z, m = torch.zeros(1, 1), torch.ones(1, 1)
    with pytest.raises(ValueError, match="clip_low"):
        ppo_clip_loss(z, z, z, m, clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high"):
        gspo_loss(z, z, z, m, clip_high=0.0)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_clip_loss(z, z, z, m, dual_clip=0.5)


def test_masked_padding_garbage_is_ignored():
    logp = torch.tensor([[-1.0, float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.2, float("-inf")]])
    adv = torch.tensor([[0.5, float("nan")]])
    mask = torch.tensor([[1.0, 0.0]])
    for name in ("ppo", "gspo", "vespo"):
        logp.grad = None
        out = get_loss(name)(logp, old, adv, mask)
        out.loss_sum.backward()
        assert torch.isfinite(out.loss_sum)
        assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
        assert all(torch.isfinite(v) for v in out.metrics.values())
