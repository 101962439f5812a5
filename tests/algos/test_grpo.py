"""GRPO / Dr.GRPO / RLOO group advantages: golden values, properties, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_spo.algos.grpo import (
    degenerate_group_fraction,
    degenerate_group_mask,
    dr_grpo_advantages,
    group_sizes,
    grpo_advantages,
    rloo_advantages,
)
from megatron_spo.algos.registry import get_advantage


def _np_group_reference(rewards, ids, mode, eps=1e-6, ddof=1):
    """Independent per-group loop in numpy: the sequence advantage of every row."""
    rewards = np.asarray(rewards, dtype=np.float64)
    ids = np.asarray(ids)
    out = np.zeros_like(rewards)
    for g in np.unique(ids):
        idx = np.where(ids == g)[0]
        r = rewards[idx]
        n = len(idx)
        if mode == "rloo":
            for j, i in enumerate(idx):
                out[i] = r[j] - np.delete(r, j).mean() if n > 1 else 0.0
            continue
        mean = r.mean() if n > 1 else 0.0
        std = r.std(ddof=ddof) if n > 1 else 1.0
        out[idx] = (r - mean) / (std + eps) if mode == "grpo" else r - mean
    return out


# ---- golden values ---------------------------------------------------------------------------

REWARDS = torch.tensor([1.0, 0.2, 0.0, 0.8, 0.0, 1.0])
IDS = torch.tensor([7, 3, 7, 3, 7, 7])  # group 7: [1, 0, 0, 1]; group 3: [0.2, 0.8] (interleaved rows)
MASK = torch.tensor(
    [
        [1, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
        [1, 1, 1, 1],
        [1, 1, 0, 0],
    ]
)


def test_grpo_two_groups_by_hand():
    adv = grpo_advantages(REWARDS, IDS, MASK)
    # group 7: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 3: mean 0.5, std sqrt(0.18) = 0.3*sqrt(2)
    s7 = math.sqrt(1.0 / 3.0) + 1e-6
    s3 = 0.3 * math.sqrt(2.0) + 1e-6
    seq = [0.5 / s7, -0.3 / s3, -0.5 / s7, 0.3 / s3, -0.5 / s7, 0.5 / s7]
    expected = torch.tensor(seq, dtype=torch.float64)[:, None] * MASK.double()
    assert adv.shape == (6, 4) and adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), expected, rtol=1e-6, atol=1e-7)
    # the numbers themselves: 0.5/0.57735 = 0.866025, 0.3/0.424264 = 0.707107
    assert adv[0, 0].item() == pytest.approx(0.8660239, abs=1e-6)
    assert adv[3, 0].item() == pytest.approx(0.7071051, abs=1e-6)


def test_grpo_matches_numpy_reference_and_population_std_option():
    ref = _np_group_reference(REWARDS.numpy(), IDS.numpy(), "grpo")
    adv = grpo_advantages(REWARDS, IDS, torch.ones(6, 1, dtype=torch.bool))
    np.testing.assert_allclose(adv[:, 0].numpy(), ref, rtol=1e-6)
    ref_pop = _np_group_reference(REWARDS.numpy(), IDS.numpy(), "grpo", eps=1e-8, ddof=0)
    adv_pop = grpo_advantages(REWARDS, IDS, torch.ones(6, 1), eps=1e-8, unbiased=False)
    np.testing.assert_allclose(adv_pop[:, 0].numpy(), ref_pop, rtol=1e-6)
    assert adv_pop[0, 0].item() == pytest.approx(1.0, abs=1e-6)  # population std of [1,0,0,1] is 0.5


def test_grpo_singleton_gets_mean0_std1():
    r = torch.tensor([0.7, 1.0, 0.0])
    ids = torch.tensor([5, 9, 9])
    adv = grpo_advantages(r, ids, torch.ones(3, 2))
    assert adv[0, 0].item() == pytest.approx(0.7 / (1 + 1e-6), rel=1e-7)
    assert adv[1, 1].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6), rel=1e-6)
    assert group_sizes(ids).tolist() == [1, 2, 2]
    assert dr_grpo_advantages(r, ids, torch.ones(3, 1))[0, 0].item() == pytest.approx(0.7)


def test_dr_grpo_by_hand():
    adv = dr_grpo_advantages(REWARDS, IDS, MASK)
    seq = torch.tensor([0.5, -0.3, -0.5, 0.3, -0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(adv.double(), seq[:, None] * MASK.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grpo_advantages(REWARDS, IDS, MASK, norm_by_std=False), adv)


def test_rloo_by_hand():
    adv = rloo_advantages(REWARDS, IDS, MASK)
    # group 7 [1,0,0,1]: 1 - 1/3 = 2/3, 0 - 2/3 = -2/3; group 3 [0.2,0.8]: 0.2-0.8 = -0.6, +0.6
    seq = torch.tensor([2 / 3, -0.6, -2 / 3, 0.6, -2 / 3, 2 / 3], dtype=torch.float64)
    torch.testing.assert_close(adv.double(), seq[:, None] * MASK.double(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(adv[:, 0].numpy(), _np_group_reference(REWARDS.numpy(), IDS.numpy(), "rloo"), rtol=1e-6)


def test_rloo_singleton_policy():
    r = torch.tensor([0.3, 1.0, 0.0])
    ids = torch.tensor([4, 8, 8])
    with pytest.raises(ValueError, match=r"group id 4 \(row 0\) has a single sample"):
        rloo_advantages(r, ids, torch.ones(3, 1))
    adv = rloo_advantages(r, ids, torch.ones(3, 1), singleton="zero")
    assert adv[:, 0].tolist() == pytest.approx([0.0, 1.0, -1.0])


def test_registry_names():
    assert get_advantage("grpo") is grpo_advantages
    assert get_advantage("dr_grpo") is dr_grpo_advantages
    assert get_advantage("rloo") is rloo_advantages


def test_degenerate_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    ids = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])  # constant, mixed, singleton, constant
    assert degenerate_group_mask(r, ids).tolist() == [True, True, False, False, False, True, True, True]
    assert degenerate_group_fraction(r, ids) == pytest.approx(2 / 4)
    # degenerate groups get exactly zero GRPO advantage
    adv = grpo_advantages(r, ids, torch.ones(8, 1))
    assert torch.all(adv[degenerate_group_mask(r, ids)] == 0)


# ---- properties ------------------------------------------------------------------------------

@st.composite
def batches(draw):
    n = draw(st.integers(min_value=1, max_value=40))
    rewards = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, 0.1, 0.3]), min_size=n, max_size=n))
    ids = draw(st.lists(st.integers(min_value=-3, max_value=6), min_size=n, max_size=n))
    perm = draw(st.permutations(list(range(n))))
    return torch.tensor(rewards), torch.tensor(ids), torch.tensor(perm)


@settings(max_examples=150, deadline=None)
@given(batches())
def test_property_zero_mean_per_group(batch):
    r, ids, _ = batch
    for fn in (grpo_advantages, dr_grpo_advantages):
        adv = fn(r, ids, torch.ones(len(r), 3))[:, 0].double()
        for g in ids.unique():
            sel = ids == g
            if int(sel.sum()) >= 2:
                assert abs(adv[sel].mean().item()) < 1e-5


@settings(max_examples=150, deadline=None)
@given(batches())
def test_property_permutation_equivariant(batch):
    r, ids, perm = batch
    mask = torch.ones(len(r), 2)
    for fn in (grpo_advantages, dr_grpo_advantages, lambda a, b, c: rloo_advantages(a, b, c, singleton="zero")):
        torch.testing.assert_close(fn(r[perm], ids[perm], mask), fn(r, ids, mask)[perm])


@settings(max_examples=150, deadline=None)
@given(batches())
def test_property_matches_per_group_loop(batch):
    r, ids, _ = batch
    mask = torch.ones(len(r), 1)
    for mode, out in (
        ("grpo", grpo_advantages(r, ids, mask)),
        ("dr_grpo", dr_grpo_advantages(r, ids, mask)),
        ("rloo", rloo_advantages(r, ids, mask, singleton="zero")),
    ):
        ref = _np_group_reference(r.numpy(), ids.numpy(), mode)
        np.testing.assert_allclose(out[:, 0].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_large_batch_vectorised_matches_loop():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (4000,), generator=gen)
    r = torch.randint(0, 2, (4000,), generator=gen).float()
    adv = grpo_advantages(r, ids, torch.ones(4000, 1))
    np.testing.assert_allclose(adv[:, 0].numpy(), _np_group_reference(r.numpy(), ids.numpy(), "grpo"), atol=1e-5)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_bad_inputs(fn):
    ok_r, ok_ids, ok_m = torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(2, 3)
    with pytest.raises(ValueError, match="group_ids shape"):
        fn(ok_r, torch.tensor([0, 0, 0]), ok_m)
    with pytest.raises(ValueError, match="response_mask must be"):
        fn(ok_r, ok_ids, torch.ones(3, 3))
    with pytest.raises(ValueError, match="response_mask must be"):
        fn(ok_r, ok_ids, torch.ones(2))
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        fn(ok_r[:, None], ok_ids, ok_m)
    with pytest.raises(ValueError, match="rewards is empty"):
        fn(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.ones(0, 3))
    with pytest.raises(ValueError, match=r"rewards\[1\] = nan is not finite"):
        fn(torch.tensor([1.0, float("nan")]), ok_ids, ok_m)
    with pytest.raises(ValueError, match=r"rewards\[0\] = inf"):
        fn(torch.tensor([float("inf"), 0.0]), ok_ids, ok_m)
    with pytest.raises(TypeError, match="group_ids must have an integer dtype"):
        fn(ok_r, torch.tensor([0.0, 0.0]), ok_m)
    with pytest.raises(ValueError, match=r"response_mask\[0, 1\] = 2.0 is not 0/1"):
        fn(ok_r, ok_ids, torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 1.0]]))


def test_bad_eps_and_singleton_option():
    with pytest.raises(ValueError, match="eps must be"):
        grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(2, 1), eps=-1.0)
    with pytest.raises(ValueError, match="singleton must be"):
        rloo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(2, 1), singleton="keep")
