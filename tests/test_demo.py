"""`megatron-spo demo` end to end at a tiny size: warm start, SPO and GRPO runs, outputs, summary line."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_spo.demo import boxed_match, demo_overrides, problems
from megatron_spo.trainer.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_reward_and_problems():
    assert len(problems()) == 100 and problems()[37] == ("What is 3 + 7?", "10")
    assert boxed_match("so \\boxed{10}", "10") == 1.0
    assert boxed_match("\\boxed{1} then \\boxed{ 10 }", "10") == 1.0  # the last box, stripped
    assert boxed_match("\\boxed{11}", "10") == 0.0 and boxed_match("10", "10") == 0.0


def test_equal_responses_per_step_for_spo_and_grpo(tmp_path):
    def responses(algo):
        kv = dict(o.split("=", 1) for o in demo_overrides(tmp_path, tmp_path, tmp_path / "d.jsonl", algo, 3))
        return int(kv["train.prompts_per_step"]) * (int(kv.get("algo.grpo.n", 1)) if algo == "grpo" else 1)

    assert responses("spo") == responses("grpo") == 64


@pytest.mark.parametrize("algo", ["spo", "grpo"])
def test_demo_command_runs_and_reports(tmp_path, algo):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-c", "import sys; from megatron_spo.cli import main; sys.exit(main(sys.argv[1:]))",
           "demo", "--algo", algo, "--steps", "2", "--warm-steps", "3", "--run-dir", str(run_dir),
           "--set", "train.eval_every=1", "--set", "rollout.eval_samples=2", "--set", "io.tensorboard=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run_dir / "train" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1]
    assert all(math.isfinite(r["loss"]) and r["rollout/samples"] == 64 for r in records)
    assert "eval/train/avg@2" in records[0] and "eval/train/avg@2" in records[1]
    assert "eval avg@2 on all 100 problems (T=1.0):" in proc.stdout and "after step 2" in proc.stdout
    assert (run_dir / "train" / "metrics.png").is_file() and (run_dir / "warm_model" / "config.json").is_file()
