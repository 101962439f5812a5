"""The GPU recipes in examples/ and the Slurm scripts in slurm/, tested without GPUs or a cluster.

* Every example YAML loads and validates with the rollout-URL override built by slurm/common.sh,
  and its numbers are the paper's (docs/algorithms.md §1.10, README batch 768x1 / 96x8).
* The Qwen3-30B-A3B memory figures quoted in the YAML are recomputed here from the architecture.
* Every script passes `bash -n` and shellcheck (warning level).
* A fake Slurm: `srun`, `scontrol`, `torchrun`, `megatron-spo`, `curl`, `hostname` and the rollout
  `python` are tiny bash stubs on PATH that record their argv. The sbatch scripts run under plain
  bash with SLURM_* variables set, and the tests assert the commands they issue.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megatron_spo.config import load_config
from megatron_spo.commands.preflight import check_launch_env

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
EXAMPLES = ROOT / "examples"
SCRIPTS = ["common.sh", "train.sbatch", "rollout.sbatch", "combined.sbatch"]
GPU_RECIPES = ["qwen3_8b_spo.yaml", "qwen3_8b_grpo.yaml", "qwen3_30b_a3b_spo.yaml"]


def urls_override(urls: str) -> str:
    """The `--set` value slurm/common.sh builds from a comma-separated URL list (the real shell code)."""
    out = subprocess.run(["bash", "-c", f'source "{SLURM}/common.sh"; urls_override "$1"', "_", urls],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


# ---------------------------------------------------------------------------------------------
# Example configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_recipe_loads_with_the_sbatch_url_override(name):
    override = urls_override("http://10.0.0.1:30000,http://10.0.0.1:30010")
    assert override == 'rollout.urls=["http://10.0.0.1:30000","http://10.0.0.1:30010"]'
    cfg = load_config(EXAMPLES / name, [override, "io.run_dir=/shared/runs/x"])
    assert cfg.rollout.urls == ["http://10.0.0.1:30000", "http://10.0.0.1:30010"]
    assert cfg.io.run_dir == "/shared/runs/x"


def _assert_shared_paper_numbers(cfg):
    """docs/algorithms.md §1.10 knobs common to the SPO and GRPO recipes of the paper."""
    assert cfg.optim.lr == 1e-6 and cfg.optim.warmup_steps == 0 and cfg.optim.clip_grad == 1.0
    assert cfg.optim.lr_schedule == "constant"
    loss = cfg.algo.loss
    assert (loss.name, loss.agg) == ("ppo", "token-mean")
    assert (loss.clip_low, loss.clip_high, loss.dual_clip) == (0.2, 0.28, 10.0)
    assert loss.kl_coef == 0.0 and loss.entropy_coef == 0.0
    r = cfg.rollout
    assert r.agent == "spo_code"
    assert (r.temperature, r.top_p, r.top_k) == (1.0, 1.0, -1)
    assert (r.eval_temperature, r.eval_top_p, r.eval_top_k, r.eval_samples) == (0.6, 0.95, 20, 16)
    assert (r.max_response_len, r.max_assistant_turns, r.max_user_turns) == (8192, 8, 8)
    assert r.tool_response_max_chars == 256
    assert cfg.data.max_prompt_len == 2048
    assert cfg.model.max_seq_len == 2048 + 8192
    t = cfg.train
    assert (t.steps, t.updates_per_step, t.eval_every, t.save_every) == (500, 8, 10, 20)


def _assert_spo_numbers(cfg):
    assert cfg.algo.advantage == "spo"
    assert cfg.train.prompts_per_step == 768                      # x 1 response = 768 responses
    assert cfg.train.prompts_per_step // cfg.train.updates_per_step == 96  # mini-batch (README: 96)
    spo = cfg.algo.spo
    assert spo.pool_size == 14000
    assert (spo.rho_type, spo.rho_min, spo.rho_max, spo.d_half) == ("kl", 0.875, 0.96, 0.06)
    assert spo.offline_n == 8 and spo.offline_values


def test_qwen3_8b_spo_numbers_are_the_spec():
    cfg = load_config(EXAMPLES / "qwen3_8b_spo.yaml")
    _assert_shared_paper_numbers(cfg)
    _assert_spo_numbers(cfg)
    assert cfg.algo.loss.tis_cap is None  # the paper's recipe has no TIS


def test_qwen3_8b_grpo_numbers_are_the_spec():
    cfg = load_config(EXAMPLES / "qwen3_8b_grpo.yaml")
    _assert_shared_paper_numbers(cfg)
    assert cfg.algo.advantage == "grpo"
    assert (cfg.train.prompts_per_step, cfg.algo.grpo.n) == (96, 8)
    assert cfg.algo.grpo.norm_by_std
    # Equal cost with the SPO recipe: 768 responses per step, mini-batches of 12 prompts x 8 = 96.
    assert cfg.train.prompts_per_step * cfg.algo.grpo.n == 768
    assert cfg.train.prompts_per_step // cfg.train.updates_per_step == 12
    spo = load_config(EXAMPLES / "qwen3_8b_spo.yaml")
    assert cfg.parallel == spo.parallel and cfg.rollout == spo.rollout and cfg.optim == spo.optim


def test_qwen3_30b_a3b_recipe_numbers_and_layout():
    cfg = load_config(EXAMPLES / "qwen3_30b_a3b_spo.yaml")
    _assert_shared_paper_numbers(cfg)
    _assert_spo_numbers(cfg)
    p = cfg.parallel
    assert (p.tensor, p.pipeline, p.expert, p.expert_tensor, p.context) == (2, 1, 8, 1, 1)
    assert p.sequence_parallel and p.distributed_optimizer  # MoE + TP>1 needs SP
    assert cfg.model.moe_aux_loss_coef == 0.0
    # The layout is valid (preflight's own check) on 8 and 32 GPUs, and not on 4 or 12.
    for world, ok in ((8, True), (32, True), (4, False), (12, False)):
        env = {"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
        checks = check_launch_env(cfg, env)
        assert all(c.ok for c in checks) is ok, (world, [c.line() for c in checks])


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipes_recompute_full_layers(name):
    m = load_config(EXAMPLES / name).model
    assert (m.recompute, m.recompute_method, m.recompute_num_layers) == ("full", "uniform", 1)


def test_qwen3_30b_a3b_on_8_gpus_offloads_the_optimizer():
    """The recipe's 8-GPU variant, as examples/README.md gives it, is a valid config."""
    text = (EXAMPLES / "qwen3_30b_a3b_spo.yaml").read_text()
    assert "--set optim.cpu_offload=true" in text and "--set optim.cpu_offload=true" in (EXAMPLES / "README.md").read_text()
    cfg = load_config(EXAMPLES / "qwen3_30b_a3b_spo.yaml", ["optim.cpu_offload=true"])
    assert cfg.optim.cpu_offload and cfg.optim.offload_fraction == 1.0 and cfg.parallel.distributed_optimizer


def test_qwen3_8b_layout_valid_on_8_gpus():
    cfg = load_config(EXAMPLES / "qwen3_8b_spo.yaml")
    env = {"WORLD_SIZE": "8", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert all(c.ok for c in check_launch_env(cfg, env))
    assert cfg.parallel.tensor == 2 and cfg.parallel.sequence_parallel and cfg.parallel.distributed_optimizer


def _per_gpu_gb(world, tp, ep, etp, pp):
    """Static bytes per GPU (GB = 1e9 B) for Qwen3-30B-A3B: bf16 weights, fp32 grads, sharded Adam."""
    vocab, hidden, layers, heads, kv_heads, head_dim, experts, moe_ffn = 151936, 2048, 48, 32, 4, 128, 128, 768
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 2 * head_dim
    replicated = layers * (hidden * experts + 2 * hidden)          # router + layer norms
    embeddings = 2 * vocab * hidden                               # untied input embedding + output layer
    expert_params = layers * experts * 3 * hidden * moe_ffn
    dense = (layers * attn + embeddings) / tp + replicated
    dense, expert = dense / pp, expert_params / (ep * etp * pp)
    dp, edp = world // (tp * pp), world // (ep * etp * pp)
    total = 2 * (dense + expert) + 4 * (dense + expert) + 12 * dense / dp + 12 * expert / edp
    return total / 1e9, (dense + expert) / 1e9


def test_qwen3_30b_a3b_memory_figures_in_the_recipe():
    text = (EXAMPLES / "qwen3_30b_a3b_spo.yaml").read_text()
    gb8, params = _per_gpu_gb(8, tp=2, ep=8, etp=1, pp=1)
    gb32, params32 = _per_gpu_gb(32, tp=2, ep=8, etp=1, pp=1)
    assert params == params32 and round(params, 2) == 4.40
    assert f"total 8.8 + 17.6 + 2.3 + 43.5 = {gb8:.1f} GB" in text and round(gb8, 1) == 72.2
    assert f"total {gb32:.1f} GB" in text and round(gb32, 1) == 37.9
    readme = (EXAMPLES / "README.md").read_text()
    assert f"{gb8:.1f} GB" in readme and f"{gb32:.1f} GB" in readme


# ---------------------------------------------------------------------------------------------
# Script hygiene
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
    subprocess.run(["bash", "-n", str(SLURM / name)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install -y shellcheck); CI should install it")
def test_shellcheck_clean_at_warning_level():
    out = subprocess.run(["shellcheck", "-x", "-S", "warning", *SCRIPTS], cwd=SLURM, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# Fake Slurm
# ---------------------------------------------------------------------------------------------

STUBS = {
    # srun: record argv, then run the command once per node of the step (in parallel), the way srun
    # would, with SLURM_PROCID and SLURMD_NODENAME of that node; a TERM kills the node processes.
    "srun": r'''
printf '%q ' "$@" >>"$FAKE_LOG/srun.log"; echo >>"$FAKE_LOG/srun.log"
echo "${SRUN_CPUS_PER_TASK:-unset}" >>"$FAKE_LOG/srun.cpus"
nodes=1; rel=0
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in --nodes=*) nodes=${1#*=} ;; --relative=*) rel=${1#*=} ;; esac
  shift
done
read -r -a hosts <<<"$FAKE_HOSTS"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null' TERM
for ((i = 0; i < nodes; i++)); do
  SLURM_PROCID=$i SLURM_NODEID=$i SLURMD_NODENAME=${hosts[$((rel + i))]} "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
''',
    "scontrol": r'''
printf '%q ' "$@" >>"$FAKE_LOG/scontrol.log"; echo >>"$FAKE_LOG/scontrol.log"
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\n' $FAKE_HOSTS; fi
''',
    # torchrun stands in for the trainer: ok | fail | wait_stop (checkpoint-and-exit on the STOP file).
    "torchrun": r'''
echo "$SLURMD_NODENAME $*" >>"$FAKE_LOG/torchrun.hosts"
echo "${RAY_ADDRESS:-}" >"$FAKE_LOG/torchrun.ray_address.$SLURMD_NODENAME"
printf '%q ' "$@" >"$FAKE_LOG/torchrun.argv.$SLURMD_NODENAME"
run_dir=""
for a in "$@"; do [[ $a == io.run_dir=* ]] && run_dir=${a#io.run_dir=}; done
case "$FAKE_TRAINER" in
  ok) exit 0 ;;
  fail) exit 3 ;;
  wait_stop)
    for ((i = 0; i < 600; i++)); do
      if [[ -f $run_dir/STOP ]]; then
        echo "$SLURMD_NODENAME saw STOP" >>"$FAKE_LOG/trainer.log"
        touch "$run_dir/PREEMPTED"; exit 0
      fi
      sleep 0.05
    done
    exit 9 ;;
esac
''',
    "megatron-spo": r'''
echo "$SLURMD_NODENAME WORLD_SIZE=${WORLD_SIZE:-} RANK=${RANK:-} MASTER=${MASTER_ADDR:-}:${MASTER_PORT:-} $*" >>"$FAKE_LOG/mspo.log"
case "$1" in
  preflight)
    if [[ "$SLURMD_NODENAME" == "${FAKE_PREFLIGHT_FAIL_HOST:-}" ]]; then
      echo "[FAIL] rollout server 0: http://10.1.0.5:30000/health not reachable within 5s"; exit 1
    fi
    echo "[ok] everything"; exit 0 ;;
  sandbox) exec sleep 60 ;;
esac
exit 2
''',
    "curl": r'''echo "$*" >>"$FAKE_LOG/curl.log"; exit 0''',
    # hostname -I: node gpuNN gets 10.0.0.NN+1 (its index in FAKE_HOSTS + 1).
    "hostname": r'''
read -r -a hosts <<<"$FAKE_HOSTS"
case "$1" in
  -I) for i in "${!hosts[@]}"; do [[ ${hosts[$i]} == "$SLURMD_NODENAME" ]] && echo "10.0.0.$((i + 1)) "; done ;;
  *) echo "${SLURMD_NODENAME:-batchhost}" ;;
esac
''',
    # ray: `start` records and (with --block) stays up; `status` answers at once.
    "fake-ray": r'''
echo "$SLURMD_NODENAME $*" >>"$FAKE_LOG/ray.log"
case "$1" in
  start) [[ " $* " == *" --block "* ]] && exec sleep 60; exit 0 ;;
  status | stop) exit 0 ;;
esac
exit 2
''',
    # The rollout servers' interpreter (PYTHON=fake-python): record and stay up.
    "fake-python": r'''echo "$SLURMD_NODENAME $*" >>"$FAKE_LOG/servers.log"; exec sleep 60''',
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, log_dir, run_dir = tmp_path / "bin", tmp_path / "log", tmp_path / "run"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body.lstrip())
        path.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_LOG": str(log_dir),
        "FAKE_HOSTS": "gpu01 gpu02 gpu03",
        "FAKE_TRAINER": "ok",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "GPUS_PER_NODE": "8",
        "CONFIG": str(EXAMPLES / "qwen3_8b_spo.yaml"),
        "RUN_DIR": str(run_dir),
        "MSPO_POLL_S": "0.05",
    }
    procs = []

    def start(script, extra_env=None, args=()):
        proc = subprocess.Popen(["bash", str(SLURM / script), *args], env={**env, **(extra_env or {})},
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        procs.append(proc)
        return proc

    def run(script, extra_env=None, args=(), timeout=60):
        proc = start(script, extra_env, args)
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out + err

    def lines(name):
        path = log_dir / name
        return path.read_text().splitlines() if path.exists() else []

    yield type("Fake", (), {"env": env, "start": start, "run": run, "lines": lines, "log": log_dir,
                            "run_dir": run_dir, "argv": lambda host: shlex.split((log_dir / f"torchrun.argv.{host}").read_text())})
    for proc in procs:  # the stubs' sleeps belong to each script's own session: end them all
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _sets(argv):
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def test_train_sbatch_builds_the_torchrun_command(fake_slurm):
    # A stale STOP / PREEMPTED from a killed job must neither stop nor requeue this one.
    fake_slurm.run_dir.mkdir()
    (fake_slurm.run_dir / "STOP").touch()
    (fake_slurm.run_dir / "PREEMPTED").touch()
    rc, out = fake_slurm.run("train.sbatch", {"ROLLOUT_URLS": "http://10.1.0.5:30000,http://10.1.0.5:30010",
                                              "SLURM_CPUS_ON_NODE": "96"}, args=["--set", "train.steps=3"])
    assert rc == 0, out
    # One task per node gets all of the node's cores (srun's default would be one core per task).
    assert fake_slurm.lines("srun.cpus") == ["96", "96", "96"]
    argv = fake_slurm.argv("gpu01")
    assert argv == fake_slurm.argv("gpu02")  # the same command on both nodes; c10d assigns ranks
    assert argv[:10] == ["--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", "gpu01:29500", "--rdzv-id", "4242"]
    assert argv[10:14] == ["-m", "megatron_spo.train", "--config", str(EXAMPLES / "qwen3_8b_spo.yaml")]
    assert argv[-2:] == ["--resume", "auto"]
    assert _sets(argv) == [f"io.run_dir={fake_slurm.run_dir}",
                           'rollout.urls=["http://10.1.0.5:30000","http://10.1.0.5:30010"]',
                           "rollout.sandbox_url=http://127.0.0.1:8080", "train.steps=3"]
    # The overrides are valid for the real config loader.
    load_config(EXAMPLES / "qwen3_8b_spo.yaml", _sets(argv))
    # Steps, in order: sandbox (overlapping), preflight, torchrun; one task per node on both nodes.
    srun = [shlex.split(line) for line in fake_slurm.lines("srun.log")]
    assert [s[s.index("bash") + 2] if "bash" in s else s[s.index("torchrun")] for s in srun] == \
        ["node_sandbox", "node_preflight", "torchrun"]
    for s in srun:
        assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--relative=0"} <= set(s)
    assert "--overlap" in srun[0]
    # Preflight ran on every node with the world size torchrun will use, before torchrun.
    pre = [line for line in fake_slurm.lines("mspo.log") if " preflight " in line]
    assert sorted(line.split()[0] for line in pre) == ["gpu01", "gpu02"]
    assert all("WORLD_SIZE=16" in line and "MASTER=gpu01:29500" in line for line in pre)
    assert {re.search(r"RANK=(\d+)", line).group(1) for line in pre} == {"0", "8"}
    assert "sandbox serve --host 127.0.0.1 --port 8080" in " ".join(fake_slurm.lines("mspo.log"))
    assert fake_slurm.lines("scontrol.log") == ["show hostnames gpu\\[01-02\\] "]  # no requeue
    assert (fake_slurm.run_dir / "TRAIN_FINISHED").exists()
    assert not (fake_slurm.run_dir / "STOP").exists() and not (fake_slurm.run_dir / "PREEMPTED").exists()


def test_train_sbatch_reads_the_url_file(fake_slurm):
    fake_slurm.run_dir.mkdir()
    (fake_slurm.run_dir / "rollout_urls.txt").write_text("# from rollout.sbatch\nhttp://10.0.0.9:30000\n\nhttp://10.0.0.9:30010\n")
    rc, out = fake_slurm.run("train.sbatch", {"START_SANDBOX": "0", "ROLLOUT_ENGINE": "vllm"})
    assert rc == 0, out
    assert _sets(fake_slurm.argv("gpu02")) == [f"io.run_dir={fake_slurm.run_dir}", "rollout.engine=vllm",
                                               'rollout.urls=["http://10.0.0.9:30000","http://10.0.0.9:30010"]']
    assert not any("node_sandbox" in line for line in fake_slurm.lines("srun.log"))


def test_failing_preflight_stops_before_torchrun(fake_slurm):
    rc, out = fake_slurm.run("train.sbatch", {"ROLLOUT_URLS": "http://10.1.0.5:30000",
                                              "FAKE_PREFLIGHT_FAIL_HOST": "gpu02"})
    assert rc == 1
    assert "[FAIL] rollout server 0: http://10.1.0.5:30000/health not reachable" in out
    assert "preflight FAILED on gpu02 (node 1 of 2)" in out
    assert "preflight failed on at least one node" in out and "torchrun was not started" in out
    assert fake_slurm.lines("torchrun.hosts") == []


def test_missing_rollout_urls_is_a_clear_error(fake_slurm):
    rc, out = fake_slurm.run("train.sbatch", {"URL_WAIT_S": "0", "START_SANDBOX": "0"})
    assert rc == 1
    assert "no rollout URLs: set ROLLOUT_URLS, or start slurm/rollout.sbatch with the same RUN_DIR" in out
    assert fake_slurm.lines("srun.log") == []


def test_usr1_writes_stop_and_requeues(fake_slurm):
    proc = fake_slurm.start("train.sbatch", {"ROLLOUT_URLS": "http://10.1.0.5:30000", "FAKE_TRAINER": "wait_stop"})
    deadline = time.monotonic() + 30
    while len(fake_slurm.lines("torchrun.hosts")) < 2:  # both trainer "nodes" are in their step
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    assert not (fake_slurm.run_dir / "STOP").exists()
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@300 does: the batch shell only
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert sorted(fake_slurm.lines("trainer.log")) == ["gpu01 saw STOP", "gpu02 saw STOP"]
    assert "received USR1" in err and "requeueing job 4242" in err
    assert fake_slurm.lines("scontrol.log")[-1] == "requeue 4242 "
    assert not (fake_slurm.run_dir / "PREEMPTED").exists()     # consumed: the requeued job trains
    assert not (fake_slurm.run_dir / "TRAIN_FINISHED").exists()


def test_failed_training_step_is_not_requeued(fake_slurm):
    rc, out = fake_slurm.run("train.sbatch", {"ROLLOUT_URLS": "http://10.1.0.5:30000", "FAKE_TRAINER": "fail"})
    assert rc == 1
    assert "the training step failed with exit code 3" in out
    assert not any("requeue" in line for line in fake_slurm.lines("scontrol.log"))


def test_combined_sbatch_splits_nodes(fake_slurm):
    env = {"SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_JOB_NUM_NODES": "3", "ROLLOUT_NODES": "1",
           "ROLLOUT_ENGINE": "sglang", "ROLLOUT_TP": "4", "MODEL": "/shared/Qwen3-8B", "PYTHON": "fake-python",
           "ROLLOUT_URLS": "http://stale:1"}
    rc, out = fake_slurm.run("combined.sbatch", env)
    assert rc == 0, out
    # Rollout: node 0 runs 8/4 = 2 SGLang servers bound to its own address, on GPUs 0-3 and 4-7.
    servers = fake_slurm.lines("servers.log")
    assert sorted(servers) == sorted(
        f"gpu01 -m sglang.launch_server --model-path /shared/Qwen3-8B --host 10.0.0.1 --port {port} --tp 4"
        for port in (30000, 30010))
    assert (fake_slurm.run_dir / "rollout_urls.txt").read_text() == "http://10.0.0.1:30000\nhttp://10.0.0.1:30010\n"
    # Training: the other two nodes, rendezvous on the first of them, URLs from this job (not the stale env).
    assert sorted(line.split()[0] for line in fake_slurm.lines("torchrun.hosts")) == ["gpu02", "gpu03"]
    argv = fake_slurm.argv("gpu02")
    assert argv[:8] == ["--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "gpu02:29500"]
    assert 'rollout.urls=["http://10.0.0.1:30000","http://10.0.0.1:30010"]' in _sets(argv)
    assert "rollout.engine=sglang" in _sets(argv)
    srun = [shlex.split(line) for line in fake_slurm.lines("srun.log")]
    assert {"--nodes=1", "--relative=0"} <= set(srun[0]) and "node_rollout" in srun[0]
    assert all({"--nodes=2", "--relative=1"} <= set(s) for s in srun[1:])


def test_combined_sbatch_with_a_ray_cluster(fake_slurm):
    env = {"SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_JOB_NUM_NODES": "3", "ROLLOUT_NODES": "2",
           "ROLLOUT_ENGINE": "ray", "RAY": "fake-ray", "RAY_SERVERS": "4", "START_SANDBOX": "0",
           "RAY_ADDRESS": "ray://stale:1"}
    rc, out = fake_slurm.run("combined.sbatch", env)
    assert rc == 0, out
    ray = sorted(fake_slurm.lines("ray.log"))
    starts = [line for line in ray if " start " in line]
    assert starts == [
        "gpu01 start --head --node-ip-address=10.0.0.1 --port=6379 --ray-client-server-port=10001 --num-gpus=8 --block",
        "gpu02 start --address=10.0.0.1:6379 --node-ip-address=10.0.0.2 --num-gpus=8 --block"]
    assert (fake_slurm.run_dir / "ray_address.txt").read_text() == "ray://10.0.0.1:10001\n"
    # The single trainer node (gpu03) gets this job's Ray Client address and no URLs.
    assert fake_slurm.lines("torchrun.hosts")[0].split()[0] == "gpu03"
    assert (fake_slurm.log / "torchrun.ray_address.gpu03").read_text() == "ray://10.0.0.1:10001\n"
    sets = _sets(fake_slurm.argv("gpu03"))
    assert sets == [f"io.run_dir={fake_slurm.run_dir}", "rollout.urls=[]", "rollout.ray_servers=4"]
    cfg = load_config(EXAMPLES / "qwen3_8b_spo.yaml", sets)
    assert cfg.rollout.urls == [] and cfg.rollout.ray_servers == 4


def test_combined_sbatch_rejects_bad_rollout_nodes(fake_slurm):
    rc, out = fake_slurm.run("combined.sbatch", {"ROLLOUT_NODES": "2"})
    assert rc == 1
    assert "ROLLOUT_NODES=2 must be at least 1 and less than the job's 2 node(s)" in out


def test_rollout_sbatch_publishes_urls_and_ends_with_training(fake_slurm):
    env = {"ROLLOUT_ENGINE": "vllm", "ROLLOUT_TP": "8", "MODEL": "/m", "PYTHON": "fake-python", "MSPO_POLL_S": "0.05"}
    proc = fake_slurm.start("rollout.sbatch", env)
    url_file = fake_slurm.run_dir / "rollout_urls.txt"
    deadline = time.monotonic() + 30
    while not url_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    assert sorted(url_file.read_text().split()) == ["http://10.0.0.1:30000", "http://10.0.0.2:30000"]
    servers = fake_slurm.lines("servers.log")
    assert len(servers) == 2 and all(
        "-m vllm.entrypoints.openai.api_server --model /m" in s and "--tensor-parallel-size 8" in s
        and "--worker-extension-cls megatron_spo.rollout.vllm_worker_ext.WorkerExtension" in s for s in servers)
    (fake_slurm.run_dir / "TRAIN_FINISHED").touch()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert "the trainer finished" in err and not url_file.exists()


@pytest.mark.slow  # imports megatron-core in a fresh process: ~15-40 s on a loaded 2-core machine
def test_real_preflight_accepts_the_scripts_arguments(fake_slurm):
    """The real `megatron-spo preflight` (not a stub) with the overrides train.sbatch builds, against
    live /health endpoints: every check passes and torchrun starts with the same overrides."""
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        env = {"SLURM_JOB_NODELIST": "gpu01", "SLURM_JOB_NUM_NODES": "1", "GPUS_PER_NODE": "1",
               "START_SANDBOX": "0", "ROLLOUT_URLS": f"{url},{url}/",
               "MSPO_CLI": str(Path(sys.executable).parent / "megatron-spo"), "OMP_NUM_THREADS": "1",
               "CONFIG": str(EXAMPLES / "qwen3_8b_spo.yaml")}
        # The 8-GPU layout cannot pass on a CPU-only machine; a one-process layout can.
        cpu = ["--set", "parallel.tensor=1", "--set", "parallel.sequence_parallel=false",
               "--set", "parallel.distributed_optimizer=false", "--set", f"rollout.sandbox_url={url}"]
        rc, out = fake_slurm.run("train.sbatch", env, args=cpu, timeout=240)
    finally:
        server.shutdown()
    assert rc == 0, out
    assert "[ok] launcher: rank 0 of 1, master gpu01:29500" in out
    assert f"[ok] rollout server 1: {url}/health answered HTTP 200" in out
    assert f"[ok] sandbox: {url}/health answered HTTP 200" in out
    assert re.search(r"preflight: \d+ ok, 0 failed", out), out
    argv = fake_slurm.argv("gpu01")
    assert argv[:4] == ["--nnodes", "1", "--nproc-per-node", "1"]
    assert _sets(argv)[-4:] == [s for s in cpu if s != "--set"]
