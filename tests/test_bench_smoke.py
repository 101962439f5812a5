"""The P2/P3/P9 benchmarks (bench/rho_modes.py, spo_vs_grpo.py, packing.py): helpers, and a tiny run of each.

The tiny runs (2-3 trainer steps, a 2-step warm start) check the output format (a table and a last
line ``ratio: <number>``) and the numbers the scripts can be held to at any size: accumulated ρ does
no scoring of its own, exact ρ re-scores every current row plus the stored ones, the GRPO arm
reaches SPO's token budget. They start megatron in fresh processes, so they are slow-marked.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
RATIO = re.compile(r"^ratio: (\S+)$")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# helpers (fast)
# ------------------------------------------------------------------------------------------------


def test_ranks_average_ties():
    rho = _load("rho_modes")
    # values 3, 1, 3, 2 -> sorted 1, 2, 3, 3: ranks 1, 2 and the tie shares (3 + 4) / 2
    assert rho.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]


def test_pearson_and_spearman_against_hand_values():
    rho = _load("rho_modes")
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    # means 2.5 and 2.5; deviations (-1.5,-.5,.5,1.5) and (-1.5,.5,-.5,1.5): Sxy = 2.25-.25-.25+2.25 = 4,
    # Sxx = Syy = 5 -> r = 0.8; the values are their own ranks, so Spearman is 0.8 as well
    assert rho.pearson(x, y) == pytest.approx(0.8, abs=1e-12)
    assert rho.spearman(x, y) == pytest.approx(0.8, abs=1e-12)
    # a monotone but non-linear relation: Spearman 1, Pearson below 1
    z = [1.0, 8.0, 27.0, 64.0]
    assert rho.spearman(x, z) == pytest.approx(1.0)
    assert rho.pearson(x, z) < 0.99
    assert math.isnan(rho.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # constant side: undefined
    assert math.isnan(rho.pearson([1.0], [2.0]))
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        rho.pearson([1.0, 2.0, 3.0], [1.0, 2.0])


def test_window_reward_and_moving_average():
    p3 = _load("spo_vs_grpo")
    steps = [{"step": i, "tokens": 10.0 * i, "reward": r} for i, r in enumerate([0.0, 0.5, 1.0, 0.25], start=1)]
    assert p3.window_reward(steps, 1, 3) == pytest.approx(0.75)  # steps 2, 3
    assert math.isnan(p3.window_reward(steps, 4, 4))
    assert p3.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


# ------------------------------------------------------------------------------------------------
# tiny runs (slow: megatron start-up in fresh processes)
# ------------------------------------------------------------------------------------------------


def _run(script: str, tmp_path: Path, *args: str) -> list:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / script), "--run-dir", str(tmp_path), "--warm-steps", "2",
                           *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    m = RATIO.match(lines[-1])
    assert m, f"last line is not 'ratio: <number>': {lines[-1]!r}"
    float(m.group(1))  # parses as a number (inf when the denominator is 0)
    return lines


@pytest.mark.slow
def test_rho_modes_tiny_run(tmp_path):
    lines = _run("rho_modes.py", tmp_path, "--steps", "3")
    assert any(line.startswith("forward work per trained token") for line in lines)
    assert any(line.startswith("D (nats/token)") for line in lines)
    res = json.loads((tmp_path / "rho_modes.json").read_text())
    ex, acc = res["exact"]["forward"], res["accumulated"]["forward"]
    # accumulated mode: old log-probs once + one training forward per row, nothing else
    assert acc["tokens_score_rho_per_trained_token"] == 0.0
    assert acc["rows_per_trained_row"] == pytest.approx(2.0)
    # exact mode: also every current row once, plus the stored rows of revisited prompts (at most one each)
    assert 3.0 <= ex["rows_per_trained_row"] <= 4.0
    ratio = float(RATIO.match(lines[-1]).group(1))
    assert ratio == pytest.approx(ex["tokens_per_trained_token"] / acc["tokens_per_trained_token"], rel=1e-3)
    assert ratio > 1.0
    g = res["exact"]["agreement"]
    assert g["pairs"] == len(res["exact"]["pairs"])
    for pair in res["exact"]["pairs"]:
        assert pair["d_exact"] >= 0 and pair["d_acc"] >= 0
        assert 0.875 - 1e-12 <= pair["rho_exact"] <= 0.96 + 1e-12


@pytest.mark.slow
def test_spo_vs_grpo_tiny_run(tmp_path):
    lines = _run("spo_vs_grpo.py", tmp_path, "--steps", "2", "--eval-every", "1", "--eval-samples", "1")
    assert any(line.startswith("ckpt | SPO step") for line in lines)
    assert (tmp_path / "spo_vs_grpo.png").stat().st_size > 0
    res = json.loads((tmp_path / "spo_vs_grpo.json").read_text())
    spo, grpo = res["spo"], res["grpo"]
    assert len(spo["steps"]) == 2 and len(spo["evals"]) == 3  # step 0 + after steps 1 and 2
    budget = spo["steps"][-1]["tokens"]
    assert budget > 0
    assert grpo["steps"][-1]["tokens"] >= budget  # GRPO ran to at least SPO's token budget
    assert grpo["evals"][-1]["tokens"] >= budget
    for arm in (spo, grpo):
        tokens = [s["tokens"] for s in arm["steps"]]
        assert tokens == sorted(tokens)
        assert all(0.0 <= e["avg"] <= 1.0 for e in arm["evals"])


@pytest.mark.slow
def test_packing_tiny_run(tmp_path):
    """bench/packing.py (P9) on 8 short sequences: packing never computes more than padding, same numbers."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "packing.json"
    proc = subprocess.run([sys.executable, str(BENCH / "packing.py"), "--sequences", "8", "--min-len", "16",
                           "--max-len", "192", "--hidden", "64", "--layers", "1", "--budget", "768", "--vocab", "512",
                           "--repeats", "1", "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    m = RATIO.match(lines[-1])
    assert m, f"last line is not 'ratio: <number>': {lines[-1]!r}"
    res = json.loads(out.read_text())
    assert float(m.group(1)) == pytest.approx(res["packed"]["computed_tokens"] / res["real_tokens"], abs=1e-4)
    assert res["real_tokens"] <= res["packed"]["computed_tokens"] < res["padded"]["computed_tokens"]
    assert res["loss_abs_diff"] <= 1e-6 and res["logp_max_abs_diff"] <= 1e-5


def test_every_benchmark_has_a_quick_mode():
    """Each bench/*.py accepts --quick (a run of at most 3 minutes that still prints its ratio: line)."""
    missing = [p.name for p in sorted(BENCH.glob("*.py")) if 'add_argument("--quick"' not in p.read_text()]
    assert not missing, f"no --quick mode: {missing}"
