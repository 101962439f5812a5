"""SPO value tracker: offline prior, ρ, updates, exact/accumulated distance, state round trip, bad input.

Golden values are computed by hand in the comments or with plain Python/NumPy arithmetic in the test.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_spo.algos.spo_tracker import ValueTracker

F64 = torch.float64


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----------------------------------------------------------------------------------------------
# Offline prior (docs/algorithms.md §1.3)
# ----------------------------------------------------------------------------------------------


def test_prior_golden_values():
    scores = {
        "a": [1, 0, 1, 1, 0, 0, 1, 1],  # s = 5 of n = 8: α0 = 8·5.5/9 = 44/9, β0 = 8·3.5/9 = 28/9
        "b": [0.0] * 8,  # s = 0: α0 = 8·0.5/9 = 4/9, β0 = 8·8.5/9 = 68/9
        "c": [1, 1, 0],  # m = 3 < n: α0 = 8·2.5/4 = 5, β0 = 8·1.5/4 = 3
        "d": [0.5, 0.0, -1.0, 1e-9],  # threshold is > 0: s = 2, m = 4: α0 = β0 = 8·2.5/5 = 4
    }
    t = ValueTracker.from_offline_scores(scores, n=8)
    assert t.prior_size == 8.0  # 1/(1 − 0.875)
    assert t.keys() == ["a", "b", "c", "d"]
    assert torch.allclose(t.alpha, torch.tensor([44 / 9, 4 / 9, 5.0, 4.0], dtype=F64), rtol=0, atol=1e-12)
    assert torch.allclose(t.beta, torch.tensor([28 / 9, 68 / 9, 3.0, 4.0], dtype=F64), rtol=0, atol=1e-12)
    # α0 + β0 = N_init = 8 for every prompt, whatever its count
    assert torch.allclose(t.alpha + t.beta, torch.full((4,), 8.0, dtype=F64), rtol=0, atol=1e-12)
    # v̂0 = (s + ½)/(m + 1)
    assert torch.allclose(t.values(["a", "c", "d"]), torch.tensor([5.5 / 9, 2.5 / 4, 0.5], dtype=F64))
    assert t.n_visits.tolist() == [0, 0, 0, 0]


def test_prior_rho_min_sets_prior_size():
    t = ValueTracker.from_offline_scores({"a": [1, 0, 0, 0]}, n=8, rho_min=0.9)
    # N = 1/(1 − 0.9) = 10; m = 4, s = 1: α0 = 10·1.5/5 = 3, β0 = 10·3.5/5 = 7
    assert t.alpha.tolist() == pytest.approx([3.0])
    assert t.beta.tolist() == pytest.approx([7.0])


def test_prior_n_zero_is_uninformative():
    t = ValueTracker.from_offline_scores({"a": [1, 1, 1], "b": []}, n=0)
    assert t.alpha.tolist() == [0.5, 0.5]
    assert t.beta.tolist() == [0.5, 0.5]


def test_prior_subsamples_more_than_n_scores():
    # 300 prompts with 12 scores, 10 of them successes; keeping 8 at random gives s ∈ {6, 7, 8}
    # (hypergeometric, mean 8·10/12 = 6.667, sd 0.636; sd of the mean over 300 prompts ≈ 0.037).
    scores = {f"p{i}": ([1] * 10 + [0, 0]) if i % 2 else ([0, 1, 1, 1, 1, 1] * 2) for i in range(300)}
    t1 = ValueTracker.from_offline_scores(scores, n=8, generator=torch.Generator().manual_seed(7))
    t2 = ValueTracker.from_offline_scores(scores, n=8, generator=torch.Generator().manual_seed(7))
    t3 = ValueTracker.from_offline_scores(scores, n=8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(t1.alpha, t2.alpha)  # seeded: deterministic
    assert not torch.equal(t1.alpha, t3.alpha)
    s = t1.alpha * 9 / 8 - 0.5  # invert α0 = 8(s + ½)/9
    assert torch.allclose(s, s.round(), atol=1e-9)
    assert set(s.round().tolist()) <= {6.0, 7.0, 8.0}
    assert abs(float(s.mean()) - 8 * 10 / 12) < 0.15
    assert torch.allclose(t1.alpha + t1.beta, torch.full((300,), 8.0, dtype=F64))
    # without a generator the draw is still deterministic (seed 0)
    assert torch.equal(ValueTracker.from_offline_scores(scores).alpha, ValueTracker.from_offline_scores(scores).alpha)


def test_prior_bad_input_names_the_key():
    with pytest.raises(ValueError, match="'empty one' has no offline scores"):
        ValueTracker.from_offline_scores({"ok": [1], "empty one": []})
    with pytest.raises(ValueError, match=r"'q2' is not finite: nan"):
        ValueTracker.from_offline_scores({"q1": [1, 0], "q2": [0, float("nan")]})
    with pytest.raises(ValueError, match=r"'q1' is not finite: inf"):
        ValueTracker.from_offline_scores({"q1": [float("inf")], "q2": [0]}, n=0)
    with pytest.raises(TypeError, match="'q2' are not all numbers"):
        ValueTracker.from_offline_scores({"q1": [1], "q2": [1, "yes"]})
    with pytest.raises(TypeError, match="'q1' must be a list"):
        ValueTracker.from_offline_scores({"q1": "1,0,1"})
    with pytest.raises(ValueError, match="no prompts"):
        ValueTracker.from_offline_scores({})
    with pytest.raises(ValueError, match="n=-1"):
        ValueTracker.from_offline_scores({"q": [1]}, n=-1)


def test_add_rejects_duplicates_and_bad_priors():
    t = ValueTracker.from_offline_scores({"a": [1]})
    with pytest.raises(ValueError, match="'a' is already tracked"):
        t.add(["b", "a"], 0.5, 0.5)
    with pytest.raises(ValueError, match="'x' is already tracked"):
        t.add(["x", "x"], 0.5, 0.5)
    with pytest.raises(ValueError, match="prior alpha of prompt 'y' is 0.0"):
        t.add(["y"], 0.0, 0.5)
    with pytest.raises(ValueError, match="non-empty str"):
        t.add([""], 0.5, 0.5)
    assert len(t) == 1  # nothing half-added
    t.add(["b", "c"], torch.tensor([1.0, 2.0]), 3.0)
    assert t.alpha.tolist() == [t.alpha[0].item(), 1.0, 2.0] and t.beta[1:].tolist() == [3.0, 3.0]
    assert "c" in t and "zz" not in t


def test_unknown_keys():
    t = ValueTracker.from_offline_scores({"a": [1], "b": [0]})
    assert t.index_of(["b", "nope", "a"]).tolist() == [1, -1, 0]
    with pytest.raises(KeyError, match="'nope' \\(batch position 1\\) is not tracked"):
        t.values(["a", "nope"])
    with pytest.raises(ValueError, match="empty batch"):
        t.values([])
    with pytest.raises(TypeError, match="single str"):
        t.values("a")


# ----------------------------------------------------------------------------------------------
# ρ (docs/algorithms.md §1.7)
# ----------------------------------------------------------------------------------------------


def test_rho_golden_values():
    t = ValueTracker()
    d = torch.tensor([0.0, 0.006, 0.01, 0.06, 1.0, 1e6], dtype=F64)
    rho = t.rho_from_distance(d)
    expected = [
        0.96,  # first visit, D = 0: 2^0 = 1 clipped to ρ_max
        2 ** (-0.1),  # 0.9330329915368074, inside the clip range
        2 ** (-1 / 6),  # 0.8908987181403393
        0.875,  # 2^(−1) = 0.5 clipped to ρ_min
        0.875,
        0.875,
    ]
    assert rho.tolist() == pytest.approx(expected, rel=0, abs=1e-15)
    assert 0.875 < rho[1] < 0.96
    assert ValueTracker(rho_type="constant", rho_constant=0.9).rho_from_distance(d).tolist() == [0.9] * 6


@settings(max_examples=200, deadline=None)
@given(
    d=st.lists(st.floats(min_value=0.0, max_value=1e300, allow_nan=False, allow_infinity=False), min_size=1, max_size=20),
    lo=st.floats(min_value=0.01, max_value=0.99),
    width=st.floats(min_value=0.0, max_value=1.0),
    d_half=st.floats(min_value=1e-4, max_value=10.0),
)
def test_rho_stays_in_clip_range(d, lo, width, d_half):
    hi = min(1.0, lo + width)
    t = ValueTracker(rho_min=lo, rho_max=hi, d_half=d_half)
    rho = t.rho_from_distance(torch.tensor(d, dtype=F64))
    assert bool(((rho >= lo) & (rho <= hi)).all())
    # and it never increases with D
    order = torch.argsort(torch.tensor(d, dtype=F64))
    assert bool((rho[order].diff() <= 0).all())


def test_rho_rejects_bad_distance():
    t = ValueTracker()
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"D\[1\]"):
            t.rho_from_distance(torch.tensor([0.0, bad]))


def test_config_validation():
    with pytest.raises(ValueError, match="rho_type"):
        ValueTracker(rho_type="kll")
    with pytest.raises(ValueError, match="rho_mode"):
        ValueTracker(rho_mode="fast")
    with pytest.raises(ValueError, match="rho_min=1.0"):
        ValueTracker(rho_min=1.0)
    with pytest.raises(ValueError, match="must not exceed"):
        ValueTracker(rho_min=0.9, rho_max=0.8)
    with pytest.raises(ValueError, match="d_half"):
        ValueTracker(d_half=0.0)


# ----------------------------------------------------------------------------------------------
# Update (docs/algorithms.md §1.8)
# ----------------------------------------------------------------------------------------------


def test_update_golden_values():
    t = ValueTracker.from_offline_scores({"a": [1, 0, 1, 1, 0, 0, 1, 1], "b": [0] * 8})
    t.update(["a", "b"], torch.tensor([1.0, 0.25], dtype=F64), torch.tensor([0.9, 0.96], dtype=F64))
    # a: α = 0.9·44/9 + 1 = 5.4, β = 0.9·28/9 + 0 = 2.8
    # b: α = 0.96·4/9 + 0.25, β = 0.96·68/9 + 0.75
    assert t.alpha.tolist() == pytest.approx([5.4, 0.96 * 4 / 9 + 0.25], abs=1e-12)
    assert t.beta.tolist() == pytest.approx([2.8, 0.96 * 68 / 9 + 0.75], abs=1e-12)
    assert t.n_visits.tolist() == [1, 1]
    assert t.values(["a"]).item() == pytest.approx(5.4 / 8.2)
    m = t.metrics()
    assert m["spo/rho_mean"] == pytest.approx(0.93)
    assert m["spo/visited_prompts"] == 2.0 and m["spo/tracked_prompts"] == 2.0


def test_duplicate_keys_apply_in_sequence():
    t = ValueTracker.from_offline_scores({"a": [1, 0, 1, 1, 0, 0, 1, 1], "b": [0] * 8})
    a0, b0 = 44 / 9, 28 / 9
    t.update(["a", "b", "a", "a"], [1.0, 0.0, 0.0, 0.5], [0.9, 0.95, 0.8, 0.7])
    alpha = 0.7 * (0.8 * (0.9 * a0 + 1.0) + 0.0) + 0.5
    beta = 0.7 * (0.8 * (0.9 * b0 + 0.0) + 1.0) + 0.5
    assert t.alpha[0].item() == pytest.approx(alpha, abs=1e-12)
    assert t.beta[0].item() == pytest.approx(beta, abs=1e-12)
    assert t.alpha[1].item() == pytest.approx(0.95 * 4 / 9, abs=1e-12)
    assert t.n_visits.tolist() == [3, 1]


@settings(max_examples=60, deadline=None)
@given(
    priors=st.lists(st.tuples(st.floats(0.01, 50.0), st.floats(0.01, 50.0)), min_size=1, max_size=6),
    steps=st.lists(st.lists(st.tuples(st.integers(0, 5), st.floats(0.0, 1.0)), min_size=1, max_size=8), min_size=1, max_size=6),
)
def test_rho_one_gives_beta_bernoulli_posterior(priors, steps):
    keys = [f"k{i}" for i in range(len(priors))]
    t = ValueTracker()
    t.add(keys, torch.tensor([p[0] for p in priors], dtype=F64), torch.tensor([p[1] for p in priors], dtype=F64))
    alpha = [p[0] for p in priors]
    beta = [p[1] for p in priors]
    visits = [0] * len(keys)
    for batch in steps:
        batch = [(i % len(keys), r) for i, r in batch]
        t.update([keys[i] for i, _ in batch], [r for _, r in batch], [1.0] * len(batch))
        for i, r in batch:  # posterior counts: α0 + Σr, β0 + Σ(1 − r)
            alpha[i] += r
            beta[i] += 1.0 - r
            visits[i] += 1
    assert t.alpha.tolist() == pytest.approx(alpha, rel=1e-12, abs=1e-12)
    assert t.beta.tolist() == pytest.approx(beta, rel=1e-12, abs=1e-12)
    assert t.n_visits.tolist() == visits


def test_update_bad_input_is_rejected_and_leaves_state_untouched():
    t = ValueTracker.from_offline_scores({"a": [1, 0], "b": [0, 0]})
    before = t.state_dict()
    cases = [
        ((["a", "b"], [1.0, float("nan")], [0.9, 0.9]), ValueError, r"reward nan of prompt 'b' \(position 1\)"),
        ((["a", "b"], [float("inf"), 0.0], [0.9, 0.9]), ValueError, r"reward inf of prompt 'a'"),
        ((["a", "b"], [1.5, 0.0], [0.9, 0.9]), ValueError, r"reward 1.5 of prompt 'a' .* not in \[0, 1\]"),
        ((["a", "b"], [0.0, -0.1], [0.9, 0.9]), ValueError, r"reward -0.1 of prompt 'b'"),
        ((["a", "b"], [0.0, 1.0], [0.0, 0.9]), ValueError, r"rho 0.0 of prompt 'a' .* not in \(0, 1\]"),
        ((["a", "b"], [0.0, 1.0], [0.9, 1.01]), ValueError, r"rho 1.01 of prompt 'b'"),
        ((["a", "b"], [0.0, 1.0], [0.9, float("nan")]), ValueError, r"rho nan"),
        ((["a", "b"], [0.0], [0.9, 0.9]), ValueError, r"rewards has shape \(1,\), expected \(2,\)"),
        ((["a", "b"], [0.0, 1.0], [[0.9, 0.9]]), ValueError, r"rho has shape \(1, 2\)"),
        (([], [], []), ValueError, "empty batch"),
        ((["a", "zz"], [0.0, 1.0], [0.9, 0.9]), KeyError, "'zz'"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            t.update(*args)
    after = t.state_dict()
    for name in ("alpha", "beta", "n_visits", "ledger_at_visit"):
        assert torch.equal(before[name], after[name])


# ----------------------------------------------------------------------------------------------
# Exact ρ mode (the reference)
# ----------------------------------------------------------------------------------------------


def _exact_tracker():
    t = ValueTracker.from_offline_scores({"a": [1, 0], "b": [0, 0], "c": [1, 1]}, rho_mode="exact")
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.7, -0.1, -0.2]], dtype=F64)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    t.remember(["a", "b"], logp, mask, rows={"input_ids": ids})
    return t


def test_exact_distance_golden():
    t = _exact_tracker()
    assert t.has_memory(["a", "c", "b"]).tolist() == [True, False, True]
    rows = t.stored_rows(["a", "c"])
    assert rows[1] is None
    assert rows[0]["input_ids"].tolist() == [5, 6, 7, 0]
    assert rows[0]["response_mask"].tolist() == [False, True, True, False]
    now = [
        torch.tensor([-9.0, -2.004, -0.492, 5.0], dtype=F64),  # masked mean |Δ| = (0.004 + 0.008)/2 = 0.006
        None,  # c: first visit, D = 0
        torch.tensor([-0.4, -0.5, -0.1, -0.3], dtype=F64),  # (0.1 + 0.2 + 0 + 0.1)/4 = 0.1
    ]
    d = t.exact_distance(["a", "c", "b"], now)
    assert d.tolist() == pytest.approx([0.006, 0.0, 0.1], abs=1e-12)
    rho = t.rho(["a", "c", "b"], now)
    assert rho.tolist() == pytest.approx([2 ** (-0.1), 0.96, 0.875], abs=1e-12)
    assert t.metrics()["spo/distance_mean"] == pytest.approx((0.006 + 0.1) / 3)


def test_exact_remember_replaces_and_empty_response_gives_zero():
    t = _exact_tracker()
    t.remember(["a"], torch.tensor([[-1.0, -1.0]]), torch.tensor([[0, 0]]))
    row = t.stored_rows(["a"])[0]
    assert set(row) == {"response_mask"}  # the old input_ids are gone with the old row
    assert row["response_mask"].tolist() == [False, False]
    assert t.exact_distance(["a"], [torch.tensor([0.0, 5.0])]).tolist() == [0.0]


def test_exact_bad_input():
    t = _exact_tracker()
    with pytest.raises(ValueError, match="logp_now for prompt 'a' .* shape \\(3,\\); its stored row has shape \\(4,\\)"):
        t.exact_distance(["a"], [torch.zeros(3)])
    with pytest.raises(ValueError, match="non-finite"):
        t.exact_distance(["a"], [torch.tensor([0.0, float("nan"), 0.0, 0.0])])
    with pytest.raises(ValueError, match="2 logp rows for 1 keys"):
        t.exact_distance(["a"], [None, None])
    with pytest.raises(KeyError, match="'zz'"):
        t.exact_distance(["zz"], [None])
    with pytest.raises(ValueError, match="logp of prompt 'b' is nan at response token 2"):
        t.remember(["a", "b"], torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, float("nan")]]), torch.ones(2, 3))
    with pytest.raises(ValueError, match="response_mask shape"):
        t.remember(["a"], torch.zeros(1, 3), torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"rows\['ids'\] must be a tensor with leading dim 1"):
        t.remember(["a"], torch.zeros(1, 3), torch.ones(1, 3), rows={"ids": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="needs logp_now"):
        t.rho(["a"])
    acc = ValueTracker.from_offline_scores({"a": [1]}, rho_mode="accumulated")
    with pytest.raises(ValueError, match="accumulated mode stores no rows"):
        acc.remember(["a"], torch.zeros(1, 2), torch.ones(1, 2))


# ----------------------------------------------------------------------------------------------
# Accumulated ρ mode (deviation)
# ----------------------------------------------------------------------------------------------


def test_accumulated_distance_golden():
    t = ValueTracker.from_offline_scores({"a": [1, 0], "b": [0, 1]}, rho_mode="accumulated")
    # step 1: a is trained; the PPO update moved the policy by 0.01
    t.record_step_drift(0.01)
    assert t.rho(["a"]).tolist() == [0.96]  # first visit
    t.update(["a"], [1.0], [0.96])
    # steps 2 and 3 train other prompts; drifts 0.002 and 0.003
    t.record_step_drift(0.002)
    t.update(["b"], [0.0], t.rho(["b"]))
    t.record_step_drift(torch.tensor(0.003, dtype=F64))
    d = t.accumulated_distance(["a", "b"])
    assert d.tolist() == pytest.approx([0.005, 0.003], abs=1e-15)
    # a: 2^(−0.005/0.06) ≈ 0.9439, inside the clip range; b: 2^(−0.05) ≈ 0.9659, clipped to 0.96
    assert t.rho(["a", "b"]).tolist() == pytest.approx([2 ** (-0.005 / 0.06), 0.96], abs=1e-15)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="record_step_drift"):
            t.record_step_drift(bad)


def test_rho_constant_mode():
    t = ValueTracker.from_offline_scores({"a": [1]}, rho_type="constant", rho_constant=0.875)
    assert t.rho(["a"]).tolist() == [0.875]
    with pytest.raises(KeyError):
        t.rho(["b"])


# ----------------------------------------------------------------------------------------------
# State round trip
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "accumulated"])
def test_state_dict_roundtrip_reproduces_next_update(mode):
    t = ValueTracker.from_offline_scores({f"p{i}": [i % 2, 1, 0] for i in range(10)}, rho_mode=mode)
    keys = ["p1", "p4", "p7"]
    if mode == "exact":
        t.remember(keys, torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), torch.ones(3, 5),
                   rows={"input_ids": torch.arange(15).view(3, 5)})
    else:
        t.record_step_drift(0.004)
    t.update(keys, [1.0, 0.0, 1.0], [0.9, 0.91, 0.92])
    t.record_step_drift(0.0015)
    loaded = _roundtrip(t.state_dict())  # weights_only=True
    clone = ValueTracker.from_state_dict(loaded)
    same_cfg = ValueTracker(rho_mode=mode)
    same_cfg.load_state_dict(loaded)

    now = list(torch.randn(3, 5, generator=torch.Generator().manual_seed(1)))
    for other in (clone, same_cfg):
        assert other.keys() == t.keys()
        if mode == "exact":
            assert torch.equal(other.exact_distance(keys, now), t.exact_distance(keys, now))
            assert torch.equal(other.stored_rows(keys)[2]["input_ids"], t.stored_rows(keys)[2]["input_ids"])
        else:
            assert torch.equal(other.accumulated_distance(keys), t.accumulated_distance(keys))
    rho = t.rho(keys, now)
    for tr in (t, clone):
        tr.update(keys + ["p0"], [0.5, 1.0, 0.0, 1.0], torch.cat([rho, torch.tensor([0.96], dtype=F64)]))
    for name in ("alpha", "beta", "n_visits", "ledger_at_visit"):
        assert torch.equal(getattr(clone, name), getattr(t, name)), name  # bitwise
    assert clone.metrics() == pytest.approx(t.metrics(), nan_ok=True)


def test_load_state_dict_checks():
    t = ValueTracker.from_offline_scores({"a": [1]})
    state = t.state_dict()
    with pytest.raises(ValueError, match="tracker config rho_min: saved 0.875 != current 0.9"):
        ValueTracker(rho_min=0.9).load_state_dict(state)
    relaxed = ValueTracker(rho_min=0.9)
    relaxed.load_state_dict(state, strict_config=False)
    assert relaxed.rho_min == 0.9 and relaxed.values(["a"]).tolist() == t.values(["a"]).tolist()
    with pytest.raises(ValueError, match="not a ValueTracker state"):
        t.load_state_dict({"format": "something else"})
    broken = dict(state, alpha=torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="'alpha' has shape"):
        ValueTracker().load_state_dict(broken)


# ----------------------------------------------------------------------------------------------
# Scale: 10^6 prompts
# ----------------------------------------------------------------------------------------------


def test_million_prompts_prior_and_vectorised_update():
    n_prompts, n_update = 1_000_000, 10_000
    patterns = [[1] * s + [0] * (8 - s) for s in range(9)]
    scores = {f"prompt-{i}": patterns[i % 9] for i in range(n_prompts)}
    t = ValueTracker.from_offline_scores(scores, n=8)
    del scores
    assert len(t) == n_prompts
    s = np.arange(n_prompts) % 9
    alpha = 8.0 * (s + 0.5) / 9.0
    beta = 8.0 * (8 - s + 0.5) / 9.0
    np.testing.assert_allclose(t.alpha.numpy(), alpha, rtol=0, atol=1e-12)
    np.testing.assert_allclose(t.beta.numpy(), beta, rtol=0, atol=1e-12)

    rng = np.random.default_rng(0)
    chosen = rng.choice(n_prompts, size=n_update, replace=False)
    r = rng.random(n_update)
    rho = 0.875 + 0.085 * rng.random(n_update)
    t.update([f"prompt-{i}" for i in chosen], torch.from_numpy(r), torch.from_numpy(rho))
    alpha[chosen] = rho * alpha[chosen] + r
    beta[chosen] = rho * beta[chosen] + (1.0 - r)
    np.testing.assert_allclose(t.alpha.numpy(), alpha, rtol=1e-15, atol=0)
    np.testing.assert_allclose(t.beta.numpy(), beta, rtol=1e-15, atol=0)
    visits = np.zeros(n_prompts, dtype=np.int64)
    visits[chosen] = 1
    assert np.array_equal(t.n_visits.numpy(), visits)
    v = t.values([f"prompt-{i}" for i in chosen[:5]]).numpy()
    np.testing.assert_allclose(v, alpha[chosen[:5]] / (alpha[chosen[:5]] + beta[chosen[:5]]), rtol=1e-15)
