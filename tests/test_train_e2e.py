"""End to end on CPU (issue 7, "Must show" 1): the real trainer under torchrun with 2 processes,
the embedded engine, SPO for 5 steps on a tool-using task against the real (isolated) sandbox.

Set-up (module fixtures, once):

- a tiny Qwen3 (2 layers, hidden 64, 1024 positions: the SPO tool prompt alone is ~520 tokens) with a
  short supervised warm start on the SPO ``<code>`` trajectory (``tests/train_e2e_support.py``: a random
  model never writes ``<code>``; the warm start teaches the format, not the arithmetic);
- 40 prompts "... a * b" (a in {2, 3}, b in {4, 5}), reward = last ``\\boxed{}`` equals the product,
  computed by ``train_e2e_support:logged_boxed_reward`` (found by the trainer as ``module:function``;
  the tests dir is on the subprocesses' PYTHONPATH), which also logs each graded sample;
- the sandbox server (``python -m megatron_spo.sandbox.cli serve``: bubblewrap, per-slot uids) on a
  free 127.0.0.1 port. Without bwrap or root the tests skip with that reason; there is no unsafe mode.

Runs (``python -m torch.distributed.run --nproc-per-node 2 -m megatron_spo.train``, ``OMP_NUM_THREADS=1``),
for each of the two 2-process layouts -- tensor parallel 2 (weights exported from TP shards) and data
parallel 2 (the batch split over ranks, exact-ρ rows gathered) -- sharing one config: ``train.steps=5``,
4 prompts per step drawn by the prioritized sampler from a pool of 8, 2 updates per step, a
checkpoint every 3 steps:

- A: uninterrupted, 5 steps;
- B: the same, SIGKILLed (the whole process group) as soon as its step-3 checkpoint is published,
  then the same command again with ``--resume auto``.

What is checked:

1. every step's loss and grad norm are finite; tool calls happened, none failed, the sandbox served
   exactly the run's tool calls, and what it printed for well-formed ``print(a * b)`` programs is the
   product (checked here by plain arithmetic);
2. the tracker was updated for exactly the sampled prompts: the pool of each step is fresh (40
   prompts = 5 steps x pool 8: one shuffled epoch), so every update is a first visit with
   ρ = ρ_max = 0.96 and the tracker after each step is known in closed form from the logged
   (prompt key, reward) pairs: v̂ = (0.96·½ + r) / (0.96 + 1) for visited prompts, ½ for the rest.
   The trainer's ``spo/visited_prompts``, ``spo/update_batch``, ``spo/value_mean``,
   ``spo/value_mean_visited`` and ``spo/baseline_mean`` must match that reference every step;
3. weights synced: each step, ``mismatch/max_abs_logp_diff`` compares the engine's sampling
   log-probs (weights streamed after the previous step) with the trainer's log-probs of the same
   tokens: ≤ 1e-5 in fp32 at every step, while the policy demonstrably moves far more than that
   between steps (the update's importance ratios leave 1 by > 1e-3);
4. kill and resume: steps 4-5 of B after the resume have bit-identical metrics (loss, grad norm,
   rewards, tracker statistics, mismatch, ...: every logged number but wall-clock timings) to A.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

import train_e2e_support as support

TESTS_DIR = Path(__file__).resolve().parent
STEPS, PROMPTS_PER_STEP, POOL = 5, 4, 8
RHO_MAX = 0.96  # config default algo.spo.rho_max: ρ of a first visit (distance 0)
KILL_AFTER = 3  # checkpoint step after which run B is killed
LAYOUTS = {"tp2": "parallel.tensor=2", "dp2": "parallel.tensor=1"}  # 2 processes: TP=2 x DP=1, or DP=2
TIMING_KEYS = re.compile(r"(^time$|^time/|seconds|per_s$)")
# Statistics of the engine's sampling log-probs. The embedded engine batches whatever requests are in
# flight (timing-dependent) and a row's log-probs change in the last bits with the batch's padding
# (measured: ~4e-7); the sampled tokens do not (per-sample seeds). Nothing trained uses them here
# (no TIS), so they are compared with a tolerance, not bit for bit; the max |Δlogp| over a step's
# tokens moves by its own size between runs (measured 0.8e-6 .. 1.9e-6) and is only bounded (≤ 1e-5).
ENGINE_LOGP_KEYS = re.compile(r"^(rollout/kl_|mismatch/)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The isolated sandbox server (bwrap + per-slot uids), concurrency 2, on a free local port."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap): the sandbox cannot isolate code")
    if os.geteuid() != 0:
        pytest.skip("the isolated sandbox (per-slot uids, cgroups) needs to run as root")
    port = free_port()
    log_path = tmp_path_factory.mktemp("sandbox") / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_spo.sandbox.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--concurrency", "2", "--uid-base", "61400"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"sandbox server exited with {proc.returncode}:\n{log_path.read_text()}"
            try:
                h = health(url)
                break
            except OSError:
                assert time.monotonic() < deadline, f"sandbox server did not come up:\n{log_path.read_text()}"
                time.sleep(0.2)
        assert h["isolation"] == "bwrap", h
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(warm-started model dir, dataset path)."""
    from megatron_spo.models.tiny import make_tiny_model_dir

    root = tmp_path_factory.mktemp("e2e_model")
    base = make_tiny_model_dir(root / "base", "qwen3", seed=0, max_position_embeddings=1024)
    loss = support.warm_start(base, root / "warm", steps=300, lr=3e-3, batch=8)
    print(f"warm start: last cross-entropy {loss:.3f}")
    return root / "warm", support.write_dataset(root / "data" / "train.jsonl")


# TP=2 runs in the default suite; DP=2 (same checks, the other 2-process layout) with the slow tests.
@pytest.fixture(scope="module", params=["tp2", pytest.param("dp2", marks=pytest.mark.slow)])
def layout(request) -> str:
    return request.param


def trainer_cmd(run_dir: Path, model: Path, data: Path, sandbox_url: str, layout: str, *extra: str) -> List[str]:
    sets = [
        f"model.path={model}", "model.max_seq_len=640", LAYOUTS[layout],
        "rollout.agent=spo_code", f"rollout.sandbox_url={sandbox_url}", "rollout.max_response_len=48",
        "rollout.max_concurrency=4", f"data.train_path={data}", f"data.reward={support.REWARD}",
        "data.max_prompt_len=600", f"train.steps={STEPS}", f"train.prompts_per_step={PROMPTS_PER_STEP}",
        "train.updates_per_step=2", "train.micro_batch_tokens=4096", f"train.save_every={KILL_AFTER}",
        "train.eval_every=0", f"algo.spo.pool_size={POOL}", "algo.advantage=spo", f"io.run_dir={run_dir}",
        "io.tensorboard=false", "optim.lr=3e-4",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megatron_spo.train"]
    for s in sets:
        cmd += ["--set", s]
    return cmd + list(extra)


def trainer_env(reward_log: Path) -> Dict[str, str]:
    path = os.pathsep.join([str(TESTS_DIR)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=path,
                **{support.LOG_ENV: str(reward_log)})


def run_trainer(cmd: List[str], env: Dict[str, str], log_path: Path, timeout: float = 900) -> str:
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    text = log_path.read_text()
    assert proc.returncode == 0, f"trainer exited with {proc.returncode}; log tail:\n{text[-6000:]}"
    return text


def metric_lines(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def by_step(records: List[dict]) -> Dict[int, dict]:
    """The last record of each step (a resumed run re-logs steps a killed run may have logged)."""
    out: Dict[int, dict] = {}
    for r in records:
        out[int(r["step"])] = r
    return out


def reward_log(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_of(uid: str) -> int:
    """Trainer sample uids are ``s{step}-{record}/{replica}``."""
    return int(re.match(r"s(\d+)-", uid).group(1))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, prepared, sandbox, layout):
    """The uninterrupted 5-step run: (run dir, metrics per step, reward log, sandbox runs served)."""
    model, data = prepared
    root = tmp_path_factory.mktemp(f"run_a_{layout}")
    run_dir, rewards = root / "run", root / "rewards.jsonl"
    served_before = health(sandbox)["served"]
    text = run_trainer(trainer_cmd(run_dir, model, data, sandbox, layout), trainer_env(rewards), root / "trainer.log")
    served = health(sandbox)["served"] - served_before
    assert f"done: {STEPS} steps" in text
    return run_dir, by_step(metric_lines(run_dir)), reward_log(rewards), served


def test_five_steps_finite_losses_and_real_tool_calls(run_a, layout):
    run_dir, metrics, samples, served = run_a
    from megatron_spo.checkpoint_dir import MARKER, step_dir_name

    manifest = json.loads((run_dir / "checkpoints" / step_dir_name(STEPS) / MARKER).read_text())
    ran = manifest["meta"]["layout"]
    assert ran["world_size"] == 2 and ran["tp"] == (2 if layout == "tp2" else 1), ran
    assert sorted(metrics) == list(range(STEPS))
    for step, m in metrics.items():
        for key in ("loss", "grad_norm", "reward/mean", "spo/value_mean"):
            assert isinstance(m[key], float) and math.isfinite(m[key]), (step, key, m.get(key))
        assert m["rollout/samples"] == PROMPTS_PER_STEP and m["rollout/errors"] == 0, (step, m)
        assert m["rollout/tool_errors"] == 0 and m["rollout/reward_errors"] == 0, (step, m)
    assert any(m["grad_norm"] > 0 for m in metrics.values()), "no step had a non-zero gradient"
    tool_calls = sum(m["rollout/tool_calls"] for m in metrics.values())
    print(f"tool calls per step: {[metrics[s]['rollout/tool_calls'] for s in range(STEPS)]}, sandbox served {served}")
    assert tool_calls > 0
    assert served == tool_calls, "every tool call of the run is one run on the sandbox, and nothing else"
    # The reward log holds each graded sample once; its tool counts agree with the metrics.
    assert len(samples) == STEPS * PROMPTS_PER_STEP
    assert sum(s["tool_calls"] for s in samples) == tool_calls
    # What the sandbox printed for well-formed programs is what Python prints for them.
    block = re.compile(r"<code>\n```python\nprint\((\d+) \* (\d+)\)\n```\n</code><interpreter>\n(.*?)\n</interpreter>",
                       re.DOTALL)
    answered = [(int(a), int(b), out) for s in samples for a, b, out in block.findall(s["response"])]
    print(f"well-formed programs answered: {answered}")
    assert answered, "no sample ran a well-formed print(a * b) program"
    for a, b, out in answered:
        assert out.strip() == str(a * b), (a, b, out)


def test_tracker_updated_for_exactly_the_sampled_prompts(run_a):
    run_dir, metrics, samples, _ = run_a
    dataset_keys = {q for q, _ in support.problems()}
    per_step: Dict[int, Dict[str, float]] = {}
    for s in samples:
        per_step.setdefault(step_of(s["uid"]), {})[s["key"]] = s["reward"]
    assert sorted(per_step) == list(range(STEPS))
    value = {k: 0.5 for k in dataset_keys}  # the Beta(½, ½) prior of every prompt
    seen: set = set()
    for step in range(STEPS):
        keys = per_step[step]
        assert len(keys) == PROMPTS_PER_STEP and set(keys) <= dataset_keys, (step, keys)
        assert not (set(keys) & seen), f"step {step} revisits {set(keys) & seen}: pools must be fresh"
        seen |= set(keys)
        m = metrics[step]
        # The baseline is read before the update: every sampled prompt is still at its prior.
        assert m["spo/baseline_mean"] == pytest.approx(sum(value[k] for k in keys) / len(keys), abs=1e-12)
        for k, r in keys.items():  # α = ρ·½ + r, β = ρ·½ + 1 − r
            value[k] = (RHO_MAX * 0.5 + r) / (RHO_MAX + 1.0)
        assert m["spo/update_batch"] == PROMPTS_PER_STEP
        assert m["spo/rho_mean"] == pytest.approx(RHO_MAX, abs=1e-12)
        assert m["spo/tracked_prompts"] == len(dataset_keys)
        assert m["spo/visited_prompts"] == len(seen)
        assert m["spo/value_mean"] == pytest.approx(sum(value.values()) / len(value), abs=1e-12)
        assert m["spo/value_mean_visited"] == pytest.approx(sum(value[k] for k in seen) / len(seen), abs=1e-12)
    # The tracker saved in the final checkpoint: visited exactly once for each sampled key, untouched elsewhere.
    from megatron_spo.megatron.checkpoint import read_caller_state

    state = read_caller_state(run_dir / "checkpoints")["tracker"]
    visits = dict(zip(state["keys"], state["n_visits"].tolist()))
    assert set(visits) == dataset_keys and sum(visits.values()) == STEPS * PROMPTS_PER_STEP
    assert {k for k, n in visits.items() if n} == seen and all(n in (0, 1) for n in visits.values())
    saved = (state["alpha"] / (state["alpha"] + state["beta"])).tolist()
    for k, v in zip(state["keys"], saved):
        assert v == pytest.approx(value[k], abs=1e-12), k
    print(f"rewards per step: {[sorted(per_step[s].values()) for s in range(STEPS)]}")


def test_engine_logprobs_equal_trainer_logprobs_after_every_sync(run_a):
    _, metrics, _, _ = run_a
    diffs = [metrics[s]["mismatch/max_abs_logp_diff"] for s in range(STEPS)]
    moved = [max(metrics[s]["actor/ratio_max"] - 1.0, 1.0 - metrics[s]["actor/ratio_min"]) for s in range(STEPS)]
    print(f"max |engine logp - trainer logp| per step: {diffs}; max |ratio - 1| in the update: {moved}")
    assert all(d <= 1e-5 for d in diffs), diffs
    # The check has teeth: between syncs the policy moves by far more than the tolerance.
    assert any(m > 1e-3 for m in moved[:-1]), moved


def kill_tree(proc: subprocess.Popen) -> List[int]:
    """SIGKILL ``proc`` and all its descendants; returns their pids once all are gone.

    torchrun starts each worker in a session of its own (``start_new_session``), so killing
    torchrun's process group would leave the ranks running: every process is killed by pid.
    """
    import psutil

    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, f"processes survived SIGKILL: {alive}"
    return [p.pid for p in tree]


def test_kill_after_checkpoint_then_resume_is_bit_identical(run_a, tmp_path, prepared, sandbox, layout):
    from megatron_spo.checkpoint_dir import MARKER, step_dir_name

    model, data = prepared
    run_dir = tmp_path / "run"
    cmd = trainer_cmd(run_dir, model, data, sandbox, layout)
    ckpt = run_dir / "checkpoints" / step_dir_name(KILL_AFTER) / MARKER
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=trainer_env(tmp_path / "rewards_killed.jsonl"), stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 900
            while not ckpt.exists():
                assert proc.poll() is None, f"trainer ended ({proc.returncode}) before its step-{KILL_AFTER} " \
                                            f"checkpoint:\n{log_path.read_text()[-6000:]}"
                assert time.monotonic() < deadline, "no step-3 checkpoint in time"
                time.sleep(0.05)
            killed = kill_tree(proc)  # torchrun and both ranks at once: no chance to clean up or save
        finally:
            if proc.poll() is None:
                kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    assert len(killed) >= 3, f"expected torchrun and its 2 workers, killed {killed}"
    assert not (run_dir / "checkpoints" / step_dir_name(STEPS)).exists(), "the run finished before the kill"
    assert not (run_dir / "PREEMPTED").exists()
    killed_steps = sorted({int(r["step"]) for r in metric_lines(run_dir)})
    print(f"killed after logging steps {killed_steps}")

    text = run_trainer(cmd + ["--resume", "auto"], trainer_env(tmp_path / "rewards_resumed.jsonl"),
                       tmp_path / "resumed.log")
    assert f"at step {KILL_AFTER}" in text and step_dir_name(KILL_AFTER) in text, text[-3000:]
    assert f"done: {STEPS} steps" in text
    resumed = by_step(metric_lines(run_dir))
    _, reference, _, _ = run_a
    for step in range(KILL_AFTER, STEPS):
        got = {k: v for k, v in resumed[step].items() if not TIMING_KEYS.search(k)}
        want = {k: v for k, v in reference[step].items() if not TIMING_KEYS.search(k)}
        assert got.keys() == want.keys(), (step, got.keys() ^ want.keys())
        different = {k: (got[k], want[k]) for k in want if got[k] != want[k] and not ENGINE_LOGP_KEYS.search(k)}
        assert not different, f"step {step + 1} after resume differs from the uninterrupted run: {different}"
        # The resume streamed the checkpoint's weights to the fresh engine (else it would sample
        # with the base model and differ by far more).
        assert got["mismatch/max_abs_logp_diff"] <= 1e-5, (step, got["mismatch/max_abs_logp_diff"])
        for k in want:
            if ENGINE_LOGP_KEYS.search(k) and k != "mismatch/max_abs_logp_diff":  # that one is bounded above
                assert got[k] == pytest.approx(want[k], abs=1e-6), (step, k, got[k], want[k])
        exact = sum(1 for k in want if not ENGINE_LOGP_KEYS.search(k))
        print(f"step {step + 1}: {exact} metrics bit-identical (loss {got['loss']!r}, grad_norm {got['grad_norm']!r}, "
              f"reward {got['reward/mean']}); max |engine - trainer logp| "
              f"{got['mismatch/max_abs_logp_diff']:.2e} (uninterrupted {want['mismatch/max_abs_logp_diff']:.2e})")
    # The resumed process rolled out exactly the prompts of the steps it ran (and no others).
    resumed_samples = reward_log(tmp_path / "rewards_resumed.jsonl")
    assert sorted({step_of(s["uid"]) for s in resumed_samples}) == list(range(KILL_AFTER, STEPS))
