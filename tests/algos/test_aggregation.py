"""Aggregation modes, shared loss-input checks and metric reduction (megatron_spo/algos/aggregation.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_spo.algos.aggregation import (
    AGG_MODES,
    aggregate,
    check_loss_inputs,
    finalize_metrics,
    reduce_metrics,
)


def np_aggregate(loss: np.ndarray, mask: np.ndarray, mode: str, max_len=None):
    """Independent reference: explicit loops over rows."""
    total, norm = 0.0, 0.0
    for i in range(loss.shape[0]):
        n = mask[i].sum()
        row = sum(loss[i, t] for t in range(loss.shape[1]) if mask[i, t])
        if mode == "token-mean":
            total += row
            norm += n
        elif n > 0:
            total += row / n if mode == "seq-mean-token-mean" else row / max_len
            norm += 1
    return total, norm


def test_golden_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    s, n = aggregate(loss, mask, "token-mean")
    assert (s.item(), n.item()) == (7.0, 3.0)  # 1+2+4 over 3 tokens
    s, n = aggregate(loss, mask, "seq-mean-token-mean")
    assert (s.item(), n.item()) == (5.5, 2.0)  # 3/2 + 4/1 over 2 non-empty rows
    s, n = aggregate(loss, mask, "seq-mean-token-sum-norm", max_len=4)
    assert (s.item(), n.item()) == (1.75, 2.0)  # (3 + 4)/4 over 2 rows


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 5),
    t=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(AGG_MODES),
    max_len=st.integers(1, 10),
)
def test_matches_numpy_reference(b, t, seed, mode, max_len):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < 0.6
    s, n = aggregate(loss, mask, mode, max_len=max_len)
    ref_s, ref_n = np_aggregate(loss.numpy(), mask.numpy(), mode, max_len)
    assert s.item() == pytest.approx(ref_s, abs=1e-12)
    assert n.item() == ref_n


def test_masked_garbage_does_not_leak_into_value_or_grad():
    loss = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, True]])
    for mode in AGG_MODES:
        if loss.grad is not None:
            loss.grad = None
        s, n = aggregate(loss, mask, mode, max_len=2)
        assert torch.isfinite(s)
        s.backward()
        assert torch.isfinite(loss.grad).all()
        assert loss.grad[0, 1] == 0 and loss.grad[1, 0] == 0
    # the last mode: gradient 1/max_len on the valid tokens
    assert loss.grad[0, 0].item() == 0.5


def test_normaliser_has_no_grad_and_float32_for_half_inputs():
    loss = torch.ones(2, 3, dtype=torch.bfloat16, requires_grad=True)
    s, n = aggregate(loss, torch.ones(2, 3), "token-mean")
    assert s.requires_grad and not n.requires_grad
    assert s.dtype == torch.float32 and n.dtype == torch.float32


def test_mode_errors():
    x, m = torch.zeros(2, 2), torch.ones(2, 2)
    with pytest.raises(ValueError) as e:
        aggregate(x, m, "sum")
    for mode in AGG_MODES:
        assert mode in str(e.value)
    with pytest.raises(ValueError, match="max_len"):
        aggregate(x, m, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="positive int"):
        aggregate(x, m, "seq-mean-token-sum-norm", max_len=0)
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        aggregate(x, torch.ones(2, 3), "token-mean")


# ----------------------------------------------------------------------------- input checks


def _inputs(b=2, t=3):
    return torch.zeros(b, t), torch.zeros(b, t), torch.zeros(b, t), torch.ones(b, t)


def test_check_inputs_shape_error_names_argument_and_both_shapes():
    lp, old, adv, m = _inputs()
    with pytest.raises(ValueError, match=r"ppo: advantages has shape \(2, 4\) but logp has shape \(2, 3\)"):
        check_loss_inputs("ppo", lp, old, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match=r"rollout_logp has shape \(3,\)"):
        check_loss_inputs("ppo", lp, old, adv, m, rollout_logp=torch.zeros(3))
    with pytest.raises(ValueError, match=r"logp must be a \[B, T\] tensor"):
        check_loss_inputs("ppo", torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3))


def test_check_inputs_empty_and_all_masked():
    lp, old, adv, m = _inputs(b=0)
    with pytest.raises(ValueError, match="empty batch"):
        check_loss_inputs("ppo", lp, old, adv, m)
    lp, old, adv, m = _inputs()
    with pytest.raises(ValueError, match="no valid token"):
        check_loss_inputs("ppo", lp, old, adv, torch.zeros_like(m))


def test_check_inputs_non_finite_at_valid_token_is_an_error_naming_position():
    lp, old, adv, m = _inputs()
    adv[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"advantages has a non-finite value nan at valid token \[1, 2\]"):
        check_loss_inputs("ppo", lp, old, adv, m)
    lp2 = lp.clone()
    lp2[0, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"logp has a non-finite value -inf at valid token \[0, 1\]"):
        check_loss_inputs("ppo", lp2, old, torch.zeros(2, 3), m)


def test_check_inputs_masked_non_finite_is_ignored_and_zeroed():
    lp, old, adv, m = _inputs()
    lp[0, 2], old[0, 2], adv[0, 2] = float("nan"), float("inf"), float("nan")
    m[0, 2] = 0
    x = check_loss_inputs("ppo", lp, old, adv, m)
    assert x.logp[0, 2] == 0 and x.old_logp[0, 2] == 0 and x.advantages[0, 2] == 0
    assert x.valid.dtype == torch.bool and x.valid.sum() == 5


def test_check_inputs_mask_must_be_binary():
    lp, old, adv, m = _inputs()
    m[1, 0] = 0.5
    with pytest.raises(ValueError, match=r"mask must be 0/1, found 0.5 at \[1, 0\]"):
        check_loss_inputs("ppo", lp, old, adv, m)


def test_check_inputs_detaches_constants_keeps_logp_grad():
    lp = torch.zeros(1, 2, requires_grad=True)
    old = torch.zeros(1, 2, requires_grad=True)
    x = check_loss_inputs("ppo", lp, old * 2, old * 3, torch.ones(1, 2))
    assert x.logp.requires_grad and not x.old_logp.requires_grad and not x.advantages.requires_grad


# ----------------------------------------------------------------------------- metrics


def test_reduce_and_finalize_metrics():
    def part(m, count, r_max):
        return {
            "m": torch.tensor(m), "m/count": torch.tensor(count), "r_max": torch.tensor(r_max),
            "none": torch.tensor(0.0), "none/count": torch.tensor(0.0),
        }

    a, b = part(3.0, 2.0, 1.5), part(5.0, 6.0, 4.0)
    red = reduce_metrics([a, b])
    assert red["m"].item() == 8.0 and red["m/count"].item() == 8.0
    assert red["r_max"].item() == 4.0
    fin = finalize_metrics(red)
    assert fin["m"] == 1.0 and fin["r_max"] == 4.0
    assert math.isnan(fin["none"])
    assert "m/count" not in fin
    # the inputs are not modified
    assert a["m"].item() == 3.0
