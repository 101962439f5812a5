"""SPO prioritized sampler and the uniform sampler: weights, distribution, no repeats, state, bad input.

The reference weights are recomputed with NumPy; the chi-square critical value is computed here from the
regularised upper incomplete gamma function (scipy is not installed).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_spo.algos.spo_sampler import PrioritizedSampler, UniformSampler
from megatron_spo.algos.spo_tracker import ValueTracker

F64 = torch.float64


def _tracker(alpha, beta, keys=None):
    t = ValueTracker()
    t.add(keys or [f"k{i}" for i in range(len(alpha))], torch.tensor(alpha, dtype=F64), torch.tensor(beta, dtype=F64))
    return t


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _chi2_critical(df: int, tail: float) -> float:
    """x with P(χ²_df > x) = tail, by bisection on Q(df/2, x/2) (regularised upper incomplete gamma)."""
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        q = torch.special.gammaincc(torch.tensor(df / 2, dtype=F64), torch.tensor(mid / 2, dtype=F64)).item()
        lo, hi = (mid, hi) if q > tail else (lo, mid)
    return 0.5 * (lo + hi)


def test_chi2_critical_value_matches_table():
    # textbook values: χ²_{0.999}(5) = 20.515, χ²_{0.95}(1) = 3.841
    assert _chi2_critical(5, 1e-3) == pytest.approx(20.515, abs=1e-3)
    assert _chi2_critical(1, 0.05) == pytest.approx(3.841, abs=1e-3)


def test_weights_and_probabilities_golden():
    alpha, beta = [1.0, 4.0, 7.5, 2.0], [7.0, 4.0, 0.5, 2.0]
    t = _tracker(alpha, beta)
    pool = ["k0", "untracked", "k1", "k2", "k3", "k1"]
    s = PrioritizedSampler(t, eps=0.05)
    v = np.array(alpha) / (np.array(alpha) + np.array(beta))  # 0.125, 0.5, 0.9375, 0.5
    w_tracked = np.sqrt(v * (1 - v)) + 0.05
    expected_w = np.array([w_tracked[0], 0.0, w_tracked[1], w_tracked[2], w_tracked[3], w_tracked[1]])
    np.testing.assert_allclose(s.weights(pool).numpy(), expected_w, rtol=1e-15)
    # hand check of one weight: v = 0.5 → √0.25 + 0.05 = 0.55
    assert s.weights(["k1"]).item() == pytest.approx(0.55, abs=1e-15)
    np.testing.assert_allclose(s.probabilities(pool).numpy(), expected_w / expected_w.sum(), rtol=1e-14)
    # all untracked: uniform
    assert s.probabilities(["x", "y", "z", "w"]).tolist() == [0.25] * 4


def test_chi_square_single_draws_match_probabilities():
    alpha, beta = [1.0, 4.0, 7.5, 2.0, 0.3, 9.0], [7.0, 4.0, 0.5, 2.0, 7.7, 3.0]
    t = _tracker(alpha, beta)
    pool = ["k0", "k1", "untracked", "k2", "k3", "k4", "k5"]
    s = PrioritizedSampler(t, seed=1234)
    p = s.probabilities(pool).numpy()
    n_draws = 8000
    counts = np.zeros(len(pool))
    for _ in range(n_draws):
        counts[s.sample(pool, 1).item()] += 1
    assert counts[2] == 0  # weight 0 is never drawn
    keep = p > 0
    expected = n_draws * p[keep]
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    critical = _chi2_critical(int(keep.sum()) - 1, 1e-3)
    assert stat < critical, (stat, critical, counts, expected)
    # and the frequencies really differ from uniform (the test has power): the uniform hypothesis is rejected
    uniform = n_draws / keep.sum()
    stat_uniform = float(((counts[keep] - uniform) ** 2 / uniform).sum())
    assert stat_uniform > 10 * critical


@settings(max_examples=60, deadline=None)
@given(
    ab=st.lists(st.tuples(st.floats(0.05, 30.0), st.floats(0.05, 30.0)), min_size=1, max_size=40),
    n_untracked=st.integers(0, 5),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    thompson=st.booleans(),
)
def test_never_repeats_within_a_draw(ab, n_untracked, frac, seed, thompson):
    t = _tracker([a for a, _ in ab], [b for _, b in ab])
    pool = [f"k{i}" for i in range(len(ab))] + [f"u{i}" for i in range(n_untracked)]
    batch = max(1, int(round(frac * len(ab))))
    out = PrioritizedSampler(t, seed=seed, thompson=thompson).sample(pool, batch)
    assert out.dtype == torch.int64 and out.shape == (batch,)
    assert len(set(out.tolist())) == batch
    assert all(0 <= i < len(ab) for i in out.tolist())  # only tracked candidates


def test_batch_larger_than_pool_uses_replacement():
    t = _tracker([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    s = PrioritizedSampler(t, seed=0)
    out = s.sample(["k0", "k1", "k2", "untracked"], 10)
    assert out.shape == (10,)
    assert len(set(out.tolist())) < 10 and set(out.tolist()) <= {0, 1, 2}
    assert s.last_stats["sampler/with_replacement"] == 1.0


def test_batch_larger_than_tracked_candidates_is_an_error():
    t = _tracker([1.0, 2.0], [3.0, 2.0])
    s = PrioritizedSampler(t)
    with pytest.raises(ValueError, match="batch_size=3 but only 2 of the 4 candidates are tracked"):
        s.sample(["k0", "u1", "k1", "u2"], 3)


def test_all_untracked_falls_back_to_uniform():
    s = PrioritizedSampler(_tracker([1.0], [1.0]), seed=3)
    pool = ["a", "b", "c", "d"]
    counts = np.zeros(4)
    for _ in range(4000):
        out = s.sample(pool, 2)
        assert out[0] != out[1]
        counts[out.numpy()] += 1
    assert s.last_stats["sampler/uniform_fallback"] == 1.0
    expected = 2000.0  # each of 4 positions appears in half of the 2-of-4 draws
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < _chi2_critical(3, 1e-3)


def test_thompson_draws_use_the_generator_and_approach_the_mean():
    alpha, beta = [1.0, 4.0, 7.5], [7.0, 4.0, 0.5]
    t = _tracker(alpha, beta)
    pool = ["k0", "k1", "k2", "u"]
    a = PrioritizedSampler(t, thompson=True, seed=5)
    b = PrioritizedSampler(t, thompson=True, seed=5)
    w1, w2 = a.weights(pool), a.weights(pool)
    assert not torch.equal(w1, w2)  # fresh Beta draws each call
    assert torch.equal(w1, b.weights(pool))  # seeded: reproducible
    assert w1[3] == 0.0 and bool((w1[:3] >= 0.05).all()) and bool((w1[:3] <= 0.55).all())
    # a very concentrated Beta (α + β = 8e6) draws v ≈ v̂: Thompson weights ≈ mean weights
    big = _tracker([1e6 * x for x in alpha], [1e6 * x for x in beta])
    mean_w = PrioritizedSampler(big).weights(pool)
    th_w = PrioritizedSampler(big, thompson=True, seed=0).weights(pool)
    assert torch.allclose(th_w, mean_w, atol=2e-3)
    # averaged over many calls, the Thompson weight is E[√(v(1 − v))] + ε with v ~ Beta(α, β):
    # compare with an independent NumPy Monte Carlo estimate
    th = PrioritizedSampler(t, thompson=True, seed=11)
    mean_th = torch.stack([th.weights(pool) for _ in range(4000)]).mean(0).numpy()
    v = np.random.default_rng(0).beta(np.array(alpha)[:, None], np.array(beta)[:, None], size=(3, 200_000))
    reference = np.sqrt(v * (1 - v)).mean(1) + 0.05
    np.testing.assert_allclose(mean_th[:3], reference, atol=5e-3)
    # and it differs from the posterior-mean weight (Jensen: E[√(v(1−v))] < √(v̂(1−v̂)))
    assert bool((torch.from_numpy(mean_th[:3]) < PrioritizedSampler(t).weights(pool)[:3] - 0.01).all())


@pytest.mark.parametrize("thompson", [False, True])
def test_state_dict_roundtrip_reproduces_next_draw(thompson):
    t = _tracker([1.0, 4.0, 7.5, 2.0, 0.3], [7.0, 4.0, 0.5, 2.0, 7.7])
    pool = ["k0", "k1", "k2", "k3", "k4", "u"]
    s = PrioritizedSampler(t, seed=42, thompson=thompson)
    s.sample(pool, 3)
    state = _roundtrip(s.state_dict())
    expected = [s.sample(pool, 3), s.sample(pool, 5)]
    other = PrioritizedSampler(t, seed=999, thompson=thompson)
    other.load_state_dict(state)
    assert torch.equal(other.sample(pool, 3), expected[0])
    assert torch.equal(other.sample(pool, 5), expected[1])
    assert other.draws == s.draws == 3 and other.seed == 42
    with pytest.raises(ValueError, match="thompson"):
        PrioritizedSampler(t, thompson=not thompson).load_state_dict(state)
    with pytest.raises(ValueError, match="not a UniformSampler state"):
        UniformSampler(seed=0).load_state_dict(state)


def test_uniform_sampler():
    pool = [f"p{i}" for i in range(10)]
    s = UniformSampler(seed=7)
    out = s.sample(pool, 10)
    assert sorted(out.tolist()) == list(range(10))  # a permutation: no repeats
    assert s.sample(pool, 25).shape == (25,)  # larger than the pool: with replacement
    state = _roundtrip(s.state_dict())
    nxt = s.sample(pool, 4)
    u = UniformSampler(seed=1)
    u.load_state_dict(state)
    assert torch.equal(u.sample(pool, 4), nxt)
    counts = np.zeros(10)
    for _ in range(5000):
        counts[s.sample(pool, 1).item()] += 1
    stat = float(((counts - 500.0) ** 2 / 500.0).sum())
    assert stat < _chi2_critical(9, 1e-3)


def test_bad_input():
    s = PrioritizedSampler(_tracker([1.0], [1.0]))
    for sampler in (s, UniformSampler()):
        with pytest.raises(ValueError, match="empty candidate pool"):
            sampler.sample([], 1)
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="batch_size"):
                sampler.sample(["k0"], bad)
        with pytest.raises(TypeError, match="single str"):
            sampler.sample("k0", 1)
    with pytest.raises(ValueError, match="eps"):
        PrioritizedSampler(_tracker([1.0], [1.0]), eps=float("nan"))
