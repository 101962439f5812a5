"""SGLang NCCL weight sync against a real SGLang server (GPU only; needs the ``sglang`` extra).

Not run on CPU machines (the ``gpu`` marker is skipped without CUDA). It starts SGLang on a tiny
random Qwen3, joins an NCCL group with it, broadcasts the weights of a second model, and checks the
server's greedy continuation and log-probs now follow that second model.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import torch

from megatron_spo.models.tiny import make_tiny_model_dir
from megatron_spo.rollout.engine import SamplingParams
from megatron_spo.rollout.weight_formats import load_hf_state

pytestmark = pytest.mark.gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_update_weights_from_distributed_follows_new_model(tmp_path):
    pytest.importorskip("sglang", reason="the sglang extra is not installed")
    from transformers import AutoModelForCausalLM

    from megatron_spo.rollout.sglang_client import SGLangClient

    dir_a = str(make_tiny_model_dir(tmp_path / "a", "qwen3", seed=0))
    dir_b = str(make_tiny_model_dir(tmp_path / "b", "qwen3", seed=1))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", dir_a, "--host",
                             "127.0.0.1", "--port", str(port), "--dtype", "float32", "--mem-fraction-static", "0.3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = SGLangClient(f"http://127.0.0.1:{port}", weight_transfer="distributed", timeout_s=120)
        t0 = time.monotonic()
        while not client.health():
            assert proc.poll() is None and time.monotonic() - t0 < 600, "SGLang did not start"
            time.sleep(2)
        client.init_weights_update_group("127.0.0.1", _free_port(), world_size=2)
        state = load_hf_state(dir_b)
        names = sorted(state)
        client.update_weights([[(n, state[n].cuda()) for n in names[i:i + 8]] for i in range(0, len(names), 8)],
                              version=1)
        prompt = [5, 6, 7, 8]
        res = client.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))[0]
        assert res.weight_version == 1
        model_b = AutoModelForCausalLM.from_pretrained(dir_b, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            logits = model_b(torch.tensor([prompt + res.token_ids], device="cuda")).logits[0].double()
        lp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
        assert res.token_ids == lp.argmax(-1).tolist()
        ref = lp.gather(-1, torch.tensor(res.token_ids, device="cuda")[:, None]).squeeze(-1).cpu()
        assert (ref - torch.tensor(res.logprobs, dtype=torch.float64)).abs().max() <= 1e-3
    finally:
        proc.terminate()
        proc.wait(timeout=60)
