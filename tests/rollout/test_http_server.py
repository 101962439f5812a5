"""The embedded engine's HTTP server: SGLang-native and vLLM shapes, weight updates, errors, CLI."""

from __future__ import annotations

import base64
import pickle
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from megatron_spo.models.tiny import make_tiny_model_dir
from megatron_spo.rollout.embedded.engine import EmbeddedEngine
from megatron_spo.rollout.embedded.server import ServerThread
from megatron_spo.rollout.weight_formats import encode_bucket, load_hf_state


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    return (str(make_tiny_model_dir(root / "a", "qwen3", seed=0)),
            str(make_tiny_model_dir(root / "b", "qwen3", seed=1)))


@pytest.fixture()
def server(dirs):
    engine = EmbeddedEngine(dirs[0])
    with ServerThread(engine) as url:
        yield engine, url
    engine.close()


def forced_logprobs(model, prompt, tokens):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0]
    lp = torch.log_softmax(logits.double(), -1)[len(prompt) - 1:-1]
    return lp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def test_generate_sglang_shapes_and_exact_logprobs(server):
    engine, url = server
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    r = httpx.post(f"{url}/generate", json={"input_ids": prompts, "return_logprob": True, "rid": "x",
                                            "sampling_params": {"max_new_tokens": 12, "ignore_eos": True}})
    assert r.status_code == 200
    items = r.json()
    assert len(items) == 2
    for i, (p, item) in enumerate(zip(prompts, items)):
        meta = item["meta_info"]
        assert meta["id"] == f"x-{i}" and meta["prompt_tokens"] == len(p) and meta["completion_tokens"] == 12
        assert meta["finish_reason"] == {"type": "length", "length": 12}
        assert meta["weight_version"] == "0"
        triples = meta["output_token_logprobs"]
        assert [t[1] for t in triples] == item["output_ids"] and all(t[2] is None for t in triples)
        ref = forced_logprobs(engine.model, p, item["output_ids"])
        assert (ref - torch.tensor([t[0] for t in triples], dtype=torch.float64)).abs().max() <= 1e-5
        assert item["text"] == engine.tokenizer.decode(item["output_ids"])
    # single prompt -> single object; stop token reported as matched
    stop = items[0]["output_ids"][3]
    r = httpx.post(f"{url}/generate", json={"input_ids": prompts[0], "return_logprob": False, "sampling_params": {
        "max_new_tokens": 12, "temperature": 0.0, "stop_token_ids": [stop]}}).json()
    assert r["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    if r["meta_info"]["finish_reason"]["type"] == "stop":
        assert r["output_ids"][-1] == r["meta_info"]["finish_reason"]["matched"]
    assert "output_token_logprobs" not in r["meta_info"]


def test_weight_updates_from_tensor_and_disk(server, dirs):
    from transformers import AutoModelForCausalLM

    engine, url = server
    state = load_hf_state(dirs[1])
    names = sorted(state)
    blobs = [encode_bucket([(n, state[n]) for n in names[i:i + 10]]) for i in range(0, len(names), 10)]
    r = httpx.post(f"{url}/update_weights_from_tensor", json={"serialized_named_tensors": blobs,
                                                              "load_format": "safetensors_b64", "weight_version": "5"})
    assert r.status_code == 200 and r.json()["success"] and r.json()["weight_version"] == "5"
    new_model = AutoModelForCausalLM.from_pretrained(dirs[1], dtype=torch.float32).eval()
    item = httpx.post(f"{url}/generate", json={"input_ids": [3, 4, 5], "return_logprob": True,
                                               "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}).json()
    assert item["meta_info"]["weight_version"] == "5"
    lps = torch.tensor([t[0] for t in item["meta_info"]["output_token_logprobs"]], dtype=torch.float64)
    assert (forced_logprobs(new_model, [3, 4, 5], item["output_ids"]) - lps).abs().max() <= 1e-5
    r = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": dirs[0], "weight_version": "6"})
    assert r.status_code == 200 and r.json()["success"]
    assert httpx.get(f"{url}/get_server_info").json()["weight_version"] == "6"
    assert torch.equal(engine.model.model.norm.weight, load_hf_state(dirs[0])["model.norm.weight"])


def test_tensor_envelope_never_unpickles(server):
    _, url = server
    evil = base64.b64encode(pickle.dumps({"model.norm.weight": torch.zeros(64)})).decode()
    r = httpx.post(f"{url}/update_weights_from_tensor", json={"serialized_named_tensors": [evil]})
    assert r.status_code == 400 and "not base64 safetensors" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/update_weights_from_tensor", json={"serialized_named_tensors": ["x"],
                                                              "load_format": "flattened_bucket"})
    assert r.status_code == 400 and "not supported on CPU" in r.json()["error"]["message"]


def test_bad_requests_get_400_naming_the_problem(server):
    engine, url = server
    long_prompt = [3] * engine.max_context
    r = httpx.post(f"{url}/generate", json={"input_ids": long_prompt, "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 400 and "prompt has 256 tokens, the context window is 256" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/generate", json={"input_ids": [1, 2], "sampling_params": {"typical_p": 0.5}})
    assert r.status_code == 400 and "typical_p" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/generate", json={"text": "hello"})
    assert r.status_code == 400 and "input_ids is required" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": "/nonexistent/dir"})
    assert r.status_code == 400 and "/nonexistent/dir" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/update_weights_from_distributed", json={"names": []})
    assert r.status_code == 400 and "NCCL" in r.json()["error"]["message"]


def test_pause_aborts_in_flight_generation_and_continue_resumes(server):
    engine, url = server
    out = {}

    def long_request():
        out["r"] = httpx.post(f"{url}/generate", timeout=60, json={
            "input_ids": [4, 5, 6], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 250, "ignore_eos": True}}).json()

    t = threading.Thread(target=long_request)
    t.start()
    t0 = time.monotonic()
    while engine.tokens_generated < 3 and time.monotonic() - t0 < 30:
        time.sleep(0.002)
    assert httpx.post(f"{url}/pause_generation", json={"mode": "abort"}).json()["success"]
    t.join(timeout=60)
    fr = out["r"]["meta_info"]["finish_reason"]
    assert fr["type"] == "abort" and 0 < len(out["r"]["output_ids"]) < 250
    assert httpx.get(f"{url}/get_server_info").json()["paused"] is True
    assert httpx.post(f"{url}/continue_generation").status_code == 200
    r = httpx.post(f"{url}/generate", json={"input_ids": [4], "sampling_params": {"max_new_tokens": 2}}).json()
    assert r["meta_info"]["completion_tokens"] >= 1
    # released memory: generation refused (503) until resumed
    assert httpx.post(f"{url}/release_memory_occupation", json={"tags": None}).json()["success"]
    assert httpx.post(f"{url}/generate", json={"input_ids": [4]}).status_code == 503
    assert httpx.post(f"{url}/resume_memory_occupation", json={"tags": None}).json()["success"]
    assert httpx.post(f"{url}/generate", json={"input_ids": [4], "sampling_params": {"max_new_tokens": 1}}
                      ).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/flush_cache").status_code == 200


def test_vllm_completions_shape(server):
    engine, url = server
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == engine.model_dir
    r = httpx.post(f"{url}/v1/completions", json={
        "model": engine.model_dir, "prompt": [[5, 6, 7], [9, 9]], "max_tokens": 6, "logprobs": 0,
        "return_token_ids": True, "ignore_eos": True, "seed": 3}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for c, p in zip(r["choices"], [[5, 6, 7], [9, 9]]):
        assert c["finish_reason"] == "length" and c["prompt_token_ids"] == p and len(c["token_ids"]) == 6
        assert c["logprobs"]["tokens"] == [f"token_id:{t}" for t in c["token_ids"]]
        ref = forced_logprobs(engine.model, p, c["token_ids"])
        assert (ref - torch.tensor(c["logprobs"]["token_logprobs"], dtype=torch.float64)).abs().max() <= 1e-5
    rpc = httpx.post(f"{url}/collective_rpc", json={"method": "update_weights_from_disk",
                                                   "args": [engine.model_dir, "9"]}).json()
    assert rpc == {"results": ["9"]} and engine.weight_version == 9
    bad = httpx.post(f"{url}/collective_rpc", json={"method": "exec", "args": []})
    assert bad.status_code == 400 and "unknown method 'exec'" in bad.json()["error"]["message"]


def test_cli_server_binds_localhost_and_serves(dirs):
    proc = subprocess.Popen([sys.executable, "-m", "megatron_spo.rollout.embedded.server", "--model", dirs[0],
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("LISTENING http://127.0.0.1:"), line
        url = line.split()[1]
        r = httpx.post(f"{url}/generate", timeout=60, json={"input_ids": [1, 2, 3], "return_logprob": True,
                                                            "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
