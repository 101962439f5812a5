"""SPO advantages: golden values vs a NumPy reference, global normalisation, cross-rank hook, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from megatron_spo.algos.registry import get_advantage
from megatron_spo.algos.spo_advantage import spo_advantages
from megatron_spo.algos.spo_tracker import ValueTracker

F64 = torch.float64


def _numpy_reference(r, v, mask, eps=1e-8):
    a = np.asarray(r, dtype=np.float64) - np.asarray(v, dtype=np.float64)
    std = a.std(ddof=1) if a.size > 1 else 0.0
    return ((a - a.mean()) / (std + eps))[:, None] * np.asarray(mask, dtype=np.float64)


def test_registered():
    assert get_advantage("spo") is spo_advantages


def test_golden_values():
    r = [1.0, 0.0, 1.0, 0.0, 1.0]
    v = [0.6, 0.2, 0.9, 0.5, 0.3]
    mask = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]]
    out = spo_advantages(torch.tensor(r, dtype=F64), torch.tensor(v, dtype=F64), torch.tensor(mask))
    np.testing.assert_allclose(out.numpy(), _numpy_reference(r, v, mask), rtol=1e-12, atol=1e-15)
    assert out.dtype == F64
    # by hand: a = [0.4, −0.2, 0.1, −0.5, 0.7], mean 0.1, Σ(a − mean)² = 0.09+0.09+0+0.36+0.36 = 0.9,
    # unbiased std = √(0.9/4) = 0.15·√10 → first row (0.3)/(0.474341649...) = 0.632455532...
    assert out[0, 0].item() == pytest.approx(0.3 / np.sqrt(0.225), rel=1e-7)
    assert out[3].tolist() == [0.0, 0.0, 0.0]  # masked row: 0 on every token


def test_dtype_follows_rewards():
    out = spo_advantages(torch.tensor([1, 0, 1]), torch.tensor([0.5, 0.5, 0.2], dtype=F64), torch.ones(3, 2, dtype=torch.bool))
    assert out.dtype == torch.float32
    out = spo_advantages(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), torch.tensor([0.5, 0.5]), torch.ones(2, 2))
    assert out.dtype == torch.bfloat16


@settings(max_examples=150, deadline=None)
@given(
    rv=st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=2, max_size=64),
    t=st.integers(1, 5),
)
def test_global_normalisation_mean_zero_std_one(rv, t):
    r = torch.tensor([x for x, _ in rv], dtype=F64)
    v = torch.tensor([y for _, y in rv], dtype=F64)
    a = (r - v).numpy()
    assume(a.std(ddof=1) > 1e-3)  # not all equal; the eps = 1e-8 term then changes the std by < 1e-5
    out = spo_advantages(r, v, torch.ones(len(rv), t))
    seq = out[:, 0].numpy()
    assert abs(seq.mean()) < 1e-9
    assert seq.std(ddof=1) == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(out, out[:, :1].expand(-1, t))  # the same advantage on every token of a response


def test_single_response_and_constant_batch_give_zero():
    out = spo_advantages(torch.tensor([1.0], dtype=F64), torch.tensor([0.3], dtype=F64), torch.ones(1, 4))
    assert out.tolist() == [[0.0, 0.0, 0.0, 0.0]]  # B = 1: no std; documented policy is 0, never NaN
    out = spo_advantages(torch.tensor([1.0, 1.0, 1.0], dtype=F64), torch.tensor([0.7, 0.7, 0.7], dtype=F64), torch.ones(3, 2))
    assert bool(torch.isfinite(out).all()) and float(out.abs().max()) < 1e-6


@pytest.mark.parametrize("cuts", [(3,), (1,), (2, 7)])
def test_cross_rank_reduce_matches_whole_batch(cuts):
    """Simulated data-parallel ranks holding unequal shares (one rank may hold a single response)."""
    gen = torch.Generator().manual_seed(0)
    r = (torch.rand(10, generator=gen, dtype=F64) > 0.5).to(F64)
    v = torch.rand(10, generator=gen, dtype=F64)
    mask = torch.rand(10, 6, generator=gen) > 0.3
    whole = spo_advantages(r, v, mask)
    bounds = (0, *cuts, 10)
    shards = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    captured = []
    for sl in shards:  # pass 1: record each rank's local (Σa, Σa², n)
        spo_advantages(r[sl], v[sl], mask[sl], reduce_fn=lambda s: (captured.append(s.clone()), s)[1])
    total = torch.stack(captured).sum(0)  # what an all-reduce(SUM) returns on every rank
    parts = [spo_advantages(r[sl], v[sl], mask[sl], reduce_fn=lambda s: total.clone()) for sl in shards]
    assert torch.allclose(torch.cat(parts), whole, rtol=1e-12, atol=1e-14)
    if cuts == (1,):  # one response on rank 0: global statistics give it a real, non-zero advantage,
        assert bool(mask[0].any()) and bool((parts[0][0][mask[0]] != 0).all())
        # whereas normalising it locally (B = 1) would give 0
        assert spo_advantages(r[:1], v[:1], mask[:1]).abs().max().item() == 0.0


def test_with_tracker_pre_update_baseline():
    """One SPO step in the documented order: baseline before the update, update after."""
    t = ValueTracker.from_offline_scores({"a": [1, 0, 1, 1, 0, 0, 1, 1], "b": [0] * 8, "c": [1] * 8})
    keys = ["a", "b", "c"]
    r = torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    baseline = t.values(keys)  # 5.5/9, 0.5/9, 8.5/9
    adv = spo_advantages(r, baseline, torch.ones(3, 1))
    np.testing.assert_allclose(adv.numpy(), _numpy_reference(r, [5.5 / 9, 0.5 / 9, 8.5 / 9], np.ones((3, 1))), rtol=1e-12)
    t.update(keys, r, t.rho_from_distance(torch.zeros(3)))
    assert not torch.allclose(t.values(keys), baseline)  # the update changed v̂, the advantages did not use it


def test_bad_input():
    ones = torch.ones(3, 2)
    r = torch.tensor([1.0, 0.0, 1.0])
    v = torch.tensor([0.5, 0.5, 0.5])
    cases = [
        ((torch.tensor([1.0, float("nan"), 0.0]), v, ones), ValueError, r"rewards\[1\] = nan is not finite"),
        ((torch.tensor([float("inf"), 0.0, 0.0]), v, ones), ValueError, r"rewards\[0\] = inf"),
        ((r, torch.tensor([0.5, float("-inf"), 0.5]), ones), ValueError, r"baseline\[1\] = -inf"),
        ((r, torch.tensor([0.5, 0.5, 1.5]), ones), ValueError, r"baseline\[2\] = 1.5 is not a probability"),
        ((torch.zeros(0), torch.zeros(0), torch.ones(0, 2)), ValueError, "empty"),
        ((r, v[:2], ones), ValueError, "baseline has 2 rows, rewards has 3"),
        ((r, v, torch.ones(2, 2)), ValueError, r"response_mask must be \[B, T\] with B = 3"),
        ((r, v, torch.ones(3)), ValueError, r"response_mask must be \[B, T\]"),
        ((r[:, None], v, ones), ValueError, "rewards must be 1-D"),
        ((r, v, torch.full((3, 2), 2.0)), ValueError, r"response_mask\[0, 0\] = 2.0 is not 0/1"),
        (([1.0, 0.0, 1.0], v, ones), TypeError, "rewards must be a torch.Tensor"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            spo_advantages(*args)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        spo_advantages(r, v, ones, eps=0.0)
