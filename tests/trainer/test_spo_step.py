"""The SPO family's pieces: tracker construction, the accumulated-drift estimate, the exact-rho round."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_spo.config import load_config
from megatron_spo.trainer import spo


def test_tracker_without_offline_values_tracks_every_prompt_at_one_half():
    cfg = load_config()
    t = spo.build_tracker(cfg, ["a", "b", "a"])
    assert t.keys() == ["a", "b"] and torch.allclose(t.values(["a", "b"]), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_tracker_from_offline_values_skips_missing_prompts(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"a": [1, 1, 0, 0, 1, 0, 1, 1], "zzz": [1]}))
    cfg = load_config(overrides=[f"algo.spo.offline_values={path}"])
    t = spo.build_tracker(cfg, ["a", "b"])
    assert "a" in t and "b" not in t and "zzz" not in t
    assert float(t.values(["a"])[0]) == pytest.approx((5 + 0.5) / 9)
    path.write_text(json.dumps({"user\na": [1]}))
    with pytest.raises(ValueError, match="none of its 1 prompt keys matches"):
        spo.build_tracker(cfg, ["a", "b"])


def test_step_drift_is_the_least_squares_per_update_slope_times_updates():
    # m_k = k * 0.01 exactly -> d = 0.01 per update, 4 updates -> 0.04
    assert spo.step_drift([0.0, 0.01, 0.02, 0.03]) == pytest.approx(0.04)
    # independent LS through the origin: d = sum(k m_k) / sum(k^2)
    m = [0.0, 0.02, 0.01]
    assert spo.step_drift(m) == pytest.approx(3 * (1 * 0.02 + 2 * 0.01) / (1 + 4))
    with pytest.raises(ValueError, match="updates_per_step >= 2"):
        spo.step_drift([0.1])


class _Actor:
    """Scores a row as -0.1 * token id (a deterministic stand-in for the policy)."""

    def __init__(self, shift: float = 0.0):
        self.shift = shift

    def score(self, batch):
        return {"logp": -0.1 * batch["input_ids"].double() + self.shift}


def test_exact_rho_round_trip():
    cfg = load_config()
    t = spo.build_tracker(cfg, ["p", "q"])
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]), "lengths": torch.tensor([3, 2]),
             "loss_mask": torch.tensor([[0, 1, 1], [0, 1, 0]], dtype=torch.float32)}
    now, remember = spo.exact_rho_inputs(_Actor(), t, ["p", "q"], [0, 1], batch, pad_id=0)
    assert now == {0: None, 1: None}  # first visits: nothing stored yet
    rho = t.rho(["p", "q"], [now[0], now[1]])
    assert torch.allclose(rho, torch.tensor([0.96, 0.96], dtype=torch.float64))  # D = 0 -> rho_max
    t.update(["p", "q"], torch.tensor([1.0, 0.0]), rho)
    spo.remember_rows(t, ["p", "q"], remember, [0, 1])
    # next visit: the policy moved by 0.01 on every token -> D = 0.01 -> rho = 2^(-1/6) = 0.8909 (inside the clip)
    now2, _ = spo.exact_rho_inputs(_Actor(shift=0.01), t, ["p", "q"], [0, 1], batch, pad_id=0)
    rho2 = t.rho(["p", "q"], [now2[0], now2[1]])
    assert torch.allclose(rho2, torch.full((2,), 2 ** (-0.01 / 0.06), dtype=torch.float64))
