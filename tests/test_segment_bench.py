"""bench/segment_vs_grpo.py: the task, the arms' configs and the statistics (fast), and its --quick run (slow)."""

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

from megatron_spo.config import load_config
from megatron_spo.demo import boxed_match

BENCH = Path(__file__).resolve().parents[1] / "bench" / "segment_vs_grpo.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_segment_vs_grpo", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_is_worked_in_steps_and_split_without_overlap(bench):
    rows = bench.problems()
    assert len(rows) == 800 and ("What is (3 + 4) * 5?", "3+4=7, 7*5=35 \\boxed{35}", "35") in rows
    assert all(boxed_match(worked, answer) == 1.0 for _, worked, answer in rows)
    train, held_out = bench.split()
    assert (len(train), len(held_out)) == (700, 100)
    assert not {q for q, _, _ in train} & {q for q, _, _ in held_out}
    assert bench.split() == (train, held_out)  # a fixed split


def test_every_arm_is_a_valid_config(bench, tmp_path):
    for arm in bench.ARMS:
        cfg = load_config(None, bench.arm_overrides(arm, tmp_path / arm, tmp_path / "warm", tmp_path / "train.jsonl",
                                                    tmp_path / "held_out.jsonl", seed=2, eval_samples=3, max_steps=8))
        assert cfg.algo.advantage == arm and cfg.train.seed == 2 and cfg.rollout.eval_samples == 3
        assert cfg.data.eval_paths == [str(tmp_path / "held_out.jsonl")]
        assert cfg.rollout.max_response_len == bench.MAX_RESPONSE
    tree = load_config(None, bench.arm_overrides("spo_tree", tmp_path, tmp_path, tmp_path, tmp_path, seed=0,
                                                 eval_samples=1, max_steps=1))
    assert tree.algo.segment.segment_len == 6 and tree.algo.segment.branching == [4, 4]


def test_mean_and_standard_error(bench):
    assert bench.mean_se([0.5]) == (0.5, 0.0)
    mean, se = bench.mean_se([0.1, 0.2, 0.6])
    assert mean == pytest.approx(0.3) and se == pytest.approx(math.sqrt(0.07 / 3))


@pytest.mark.slow
def test_quick_run_prints_the_ratio(tmp_path):
    """``--quick``: every arm once at GRPO's token budget, the table, the PNG and ``ratio:`` last."""
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--run-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = [line for line in proc.stdout.splitlines() if line.strip()][-1]
    assert re.match(r"^ratio: \S+$", last), last
    res = json.loads((tmp_path / "segment_vs_grpo.json").read_text())["results"]
    budget = res["grpo"][0]["evals"][-1]["tokens"]
    for arm in ("spo", "spo_chain", "spo_tree"):
        final = res[arm][0]["evals"][-1]
        assert final["tokens"] >= budget or final["step"] == 8  # reached GRPO's budget, or the step cap
    assert (tmp_path / "segment_vs_grpo.png").stat().st_size > 0
