"""SIGTERM while a reward is stuck: the trainer still checkpoints and exits 0 within 30 s.

The reward (tests/stuck_reward_support.py) hangs in C code, holding the interpreter lock, on one sample
of step 1. It runs in a reward worker process, so the trainer's own interpreter stays free: the signal
handler runs at once, the worker is killed at the hard reward timeout (that sample's reward is 0), the
step finishes, and the loop checkpoints and exits as on any preemption.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_spo.models.tiny import make_tiny_model_dir
from megatron_spo.rollout.reward_pool import DEFAULT_TIMEOUT_S
from megatron_spo.trainer.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigterm_during_a_stuck_reward_checkpoints_and_exits_0_within_30s(tmp_path):
    make_tiny_model_dir(tmp_path / "model", "qwen3", seed=0)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
                                                 + "\n" for a in range(5) for b in range(5)))
    marker, run_dir = tmp_path / "STUCK", tmp_path / "run"
    args = [sys.executable, "-m", "megatron_spo.train",
            "--set", f"model.path={tmp_path / 'model'}", "--set", f"data.train_path={tmp_path / 'data.jsonl'}",
            "--set", "data.reward=stuck_reward_support:stuck_on_one_sample", "--set", "train.prompts_per_step=8",
            "--set", "train.updates_per_step=2", "--set", "rollout.max_response_len=8",
            "--set", "algo.spo.pool_size=20", "--set", "train.save_every=100", "--set", "io.tensorboard=false",
            "--set", "train.steps=50", "--set", f"io.run_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
               STUCK_UID="s1-0/0", STUCK_MARKER=str(marker))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the reward never got stuck"
            time.sleep(0.1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert took < 30.0, f"exit {took:.1f}s after SIGTERM"
    assert (run_dir / "PREEMPTED").read_text() == "SIGTERM at step 2\n"
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE.json").is_file()
    step1 = read_metrics(run_dir / "metrics.jsonl")[1]
    assert step1["step"] == 1 and step1["rollout/reward_timeouts"] == 1 and step1["rollout/samples"] == 8
    assert "sample s1-0/0 timed out" in err
    print(f"SIGTERM -> exit 0 in {took:.1f}s (reward timeout {DEFAULT_TIMEOUT_S:g}s)")
