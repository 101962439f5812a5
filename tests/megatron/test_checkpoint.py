"""Trainer checkpoints: bit-exact resume after a kill, truncated-checkpoint fallback, TP=2 -> TP=1 reshard.

Three torchrun launches (see _ckpt_worker.py for the training step and why torchrun):
1. one process trains 6 steps uninterrupted (the reference), then a fresh model trains again, saves
   at step 3 and is killed (``os._exit``) in the middle of saving step 4;
2. two processes (TP=2, no dropout) train 2 steps, save, and record logits and the next loss;
3. one new process resumes from the root, trains steps 4..6, saves step 6, truncates a file of it,
   loads again (falls back to step 3), and finally loads the TP=2 checkpoint into a TP=1 model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_spo.models.tiny import make_tiny_model_dir

WORKER = str(Path(__file__).with_name("_ckpt_worker.py"))


def _torchrun(nproc: int, *args: str, log: Path, expect_ok: bool = True) -> None:
    """Run the worker under torchrun in its own process group, then kill what is left of that group.

    A worker killed mid-run leaves dist_checkpointing's writer-queue manager process orphaned (as a
    preempted job would; Slurm reaps the cgroup). torchrun puts workers in their own sessions, so the
    worker reports that manager's pid and the fixture kills it. Output goes to a file, not a pipe, so
    an orphan holding the pipe cannot hang the test.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", WORKER, *args]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if (rc == 0) != expect_ok:
        raise AssertionError(f"{' '.join(cmd)} exited {rc}\n{log.read_text()[-8000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    hf = str(make_tiny_model_dir(tmp / "hf", "qwen3"))
    root, tp2_root = tmp / "run", tmp / "run_tp2"
    first, tp2, resume = tmp / "first.json", tmp / "tp2.json", tmp / "resume.json"
    _torchrun(1, "interrupted", str(first), hf, str(root), log=tmp / "first.log", expect_ok=False)
    for pid in json.loads(Path(str(first) + ".orphans").read_text()):
        try:
            os.kill(pid, signal.SIGKILL)  # the killed worker's multiprocessing manager
        except ProcessLookupError:
            pass
    after_kill = sorted(p.name for p in root.iterdir())
    _torchrun(2, "tp2", str(tp2), hf, str(tp2_root), log=tmp / "tp2.log")
    _torchrun(1, "resume", str(resume), hf, str(root), str(tp2_root), log=tmp / "resume.log")
    return {"first": json.loads(first.read_text()), "tp2": json.loads(tp2.read_text()),
            "resume": json.loads(resume.read_text()), "after_kill": after_kill}


def test_killed_save_leaves_previous_checkpoint_published(runs):
    assert runs["after_kill"] == [".tmp-step_00000004", "latest", "step_00000003"]
    assert runs["resume"]["loaded_step"] == 3


def test_resume_is_bit_identical_to_uninterrupted_run(runs):
    ref = runs["first"]["reference"]
    assert len(ref) == 6 and len(set(ref)) == 6
    assert runs["first"]["interrupted"] == ref[:4]  # the same run up to the kill
    assert runs["resume"]["resumed"] == ref[3:6]  # steps 4, 5, 6 after the restart: exact floats
    caller = runs["resume"]["loaded_caller"]
    assert caller["step"] == 3 and caller["data_pos"] == 6 and caller["weight_version"] == 3
    assert sorted(caller["tracker"]) == ["prompt-1", "prompt-2", "prompt-3"]
    assert runs["resume"]["rank_state"] == {"rank": 0} and runs["resume"]["rng_restored"] is True


def test_rng_restore_matters(runs):
    # Negative control: same weights, optimizer and data position, RNG not restored -> a different step 4.
    assert runs["resume"]["no_rng"] != runs["first"]["reference"][3:4]


def test_truncated_checkpoint_refused_and_previous_used(runs):
    r = runs["resume"]
    assert r["published"] == ["latest", "step_00000003", "step_00000006"]  # keep_last=2; stale .tmp removed
    assert r["fallback_step"] == 3
    assert r["after_fallback"] == runs["first"]["reference"][3:4]
    assert r["explicit_truncated"].startswith("IncompleteCheckpointError")
    assert "step_00000006 is corrupt" in r["explicit_truncated"] and "truncated" in r["explicit_truncated"]


def test_tp2_checkpoint_loads_resharded_at_tp1(runs):
    import torch

    r, tp2 = runs["resume"], runs["tp2"]
    assert r["reshard_step"] == 2
    assert r["reshard_rank_state"] is None and r["reshard_rng_restored"] is False  # layout changed: not restored
    diff = (torch.tensor(r["reshard_logits"]) - torch.tensor(tp2["logits"])).abs().max().item()
    assert diff <= 1e-5, diff
    # The next step depends on the Adam moments and the scheduler: both came through the reshard.
    assert abs(r["reshard_next_loss"] - tp2["next_loss"]) <= 1e-5


def test_model_only_checkpoint_refuses_optimizer_load(runs):
    r = runs["resume"]
    assert "holds no optimizer state" in r["model_only_with_optimizer"]
    assert r["model_only_step"] == 0
