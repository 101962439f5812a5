"""One contract test suite for the SGLang and vLLM clients, run against the embedded server,
plus bad-server behaviour (unreachable, 500, garbage, hanging): a clear EngineError, never a hang."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import torch

from megatron_spo.models.tiny import make_tiny_model_dir
from megatron_spo.rollout.embedded.engine import EmbeddedEngine
from megatron_spo.rollout.embedded.server import ServerThread
from megatron_spo.rollout.engine import Engine, EngineError, RequestError, SamplingParams
from megatron_spo.rollout.sglang_client import SGLangClient
from megatron_spo.rollout.vllm_client import VLLMClient
from megatron_spo.rollout.weight_formats import load_hf_state

CLIENTS = {"sglang": SGLangClient, "vllm": VLLMClient}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    return (str(make_tiny_model_dir(root / "a", "qwen3", seed=0)),
            str(make_tiny_model_dir(root / "b", "qwen3", seed=1)))


@pytest.fixture(scope="module")
def reference(dirs):
    """A second, never-served engine on the same weights: what the server must reproduce."""
    return EmbeddedEngine(dirs[0])


@pytest.fixture(params=sorted(CLIENTS))
def served(request, dirs):
    engine = EmbeddedEngine(dirs[0])
    with ServerThread(engine) as url:
        client = CLIENTS[request.param](url, timeout_s=60, retries=1, backoff_s=0.05)
        yield engine, client
        client.close()
    engine.close()


def forced_logprobs(model, prompt, tokens, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(tokens)])).logits[0].double()
    lp = torch.log_softmax(logits / temperature, -1)[len(prompt) - 1:-1]
    return lp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


def test_client_is_an_engine(served):
    _, client = served
    assert isinstance(client, Engine) and client.health()


def test_seeded_generation_equals_the_engine_in_process(served, reference):
    engine, client = served
    sp = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.95, seed=17, ignore_eos=True)
    got = client.generate(PROMPTS, sp)
    want = reference.generate(PROMPTS, sp)
    for g, w, p in zip(got, want, PROMPTS):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason == "length"
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-6)
        assert (forced_logprobs(engine.model, p, g.token_ids, 0.8) -
                torch.tensor(g.logprobs, dtype=torch.float64)).abs().max() <= 1e-5
        assert g.prompt_len == len(p) and g.weight_version == 0


def test_concurrent_agenerate_keeps_request_ids(served):
    _, client = served

    async def run():
        sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
        return await asyncio.gather(*[client.agenerate(p, sp, request_id=f"q{i}") for i, p in enumerate(PROMPTS)])

    results = asyncio.run(run())
    assert [len(r.token_ids) for r in results] == [5, 5, 5]
    assert [r.meta["request_id"] for r in results] == ["q0", "q1", "q2"]


def test_stop_string_and_stop_token_are_kept_and_reported(served, reference):
    _, client = served
    greedy = reference.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True))[0]
    stop_tok = greedy.token_ids[5]
    r = client.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=(stop_tok,),
                                                      ignore_eos=True))[0]
    assert r.finish_reason == "stop" and r.token_ids == greedy.token_ids[:greedy.token_ids.index(stop_tok) + 1]
    assert r.meta["matched"] == stop_tok
    stop_str = reference.tokenizer.decode(greedy.token_ids[:8])[-2:]
    r = client.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30, temperature=0.0, stop=(stop_str,),
                                                      ignore_eos=True))[0]
    assert r.finish_reason == "stop" and r.meta["matched"] == stop_str
    assert stop_str in reference.tokenizer.decode(r.token_ids) and r.token_ids == greedy.token_ids[:len(r.token_ids)]
    never = client.generate([PROMPTS[0]], SamplingParams(max_new_tokens=7, stop=("\u2603\u2603",), ignore_eos=True))[0]
    assert never.finish_reason == "length" and len(never.token_ids) == 7


def test_weight_updates_from_buckets_and_disk(served, dirs):
    from transformers import AutoModelForCausalLM

    engine, client = served
    state = load_hf_state(dirs[1])
    names = sorted(state)
    client.update_weights([[(n, state[n]) for n in names[i:i + 9]] for i in range(0, len(names), 9)], version=2)
    assert client.weight_version == 2 and engine.weight_version == 2
    new_model = AutoModelForCausalLM.from_pretrained(dirs[1], dtype=torch.float32).eval()
    r = client.generate([PROMPTS[1]], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    assert r.weight_version == 2
    assert (forced_logprobs(new_model, PROMPTS[1], r.token_ids) -
            torch.tensor(r.logprobs, dtype=torch.float64)).abs().max() <= 1e-5
    client.update_weights(dirs[0], version=3)
    assert engine.weight_version == 3 and torch.equal(engine.model.lm_head.weight,
                                                      load_hf_state(dirs[0])["lm_head.weight"])


def test_pause_gives_abort_then_resume(served):
    engine, client = served
    box = {}

    def run():
        box["r"] = client.generate([[4, 4]], SamplingParams(max_new_tokens=250, ignore_eos=True))[0]

    t = threading.Thread(target=run)
    t.start()
    t0 = time.monotonic()
    while engine.tokens_generated < 3 and time.monotonic() - t0 < 30:
        time.sleep(0.002)
    client.pause()
    t.join(timeout=60)
    assert box["r"].finish_reason == "abort" and 0 < len(box["r"].token_ids) < 250
    assert len(box["r"].logprobs) == len(box["r"].token_ids)
    client.resume()
    assert client.generate([[4]], SamplingParams(max_new_tokens=2, ignore_eos=True))[0].finish_reason == "length"
    client.release_memory_occupation()
    with pytest.raises(EngineError, match="503"):
        client.generate([[4]], SamplingParams(max_new_tokens=2))
    client.resume_memory_occupation()
    client.flush_cache()
    assert client.generate([[4]], SamplingParams(max_new_tokens=2, ignore_eos=True))[0].finish_reason == "length"


def test_prompt_longer_than_context_is_a_request_error_not_retried(served):
    engine, client = served
    with pytest.raises(RequestError, match=r"HTTP 400: .*prompt has 300 tokens, the context window is 256"):
        client.generate([[3] * 300], SamplingParams(max_new_tokens=4))
    with pytest.raises(RequestError, match="400"):
        asyncio.run(client.agenerate([3] * 300, SamplingParams(max_new_tokens=4)))


# ------------------------------------------------------------------------------ bad servers


def make_client(kind, url, **kw):
    if kind == "vllm":
        kw["model"] = "m"  # do not ask /v1/models first: the bad answer must come from /v1/completions
    return CLIENTS[kind](url, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    """A server that answers every route the same bad way: 'status500', 'garbage', 'hang' or 'wrong'."""

    def __init__(self, mode: str):
        self.mode, self.hits = mode, 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handler(self, request):
        from aiohttp import web

        self.hits += 1
        if self.mode == "status500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if self.mode == "garbage":
            return web.Response(text="<html>proxy error</html>", content_type="text/html")
        if self.mode == "wrong":  # valid JSON, wrong shape
            return web.json_response({"data": [{"id": "m"}], "choices": [{"index": 0}], "meta_info": {}})
        try:  # hang until the test is over
            await asyncio.wait_for(self.release.wait(), 30)
        except asyncio.TimeoutError:
            pass
        return web.json_response({})

    async def _start(self):
        from aiohttp import web

        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    def __enter__(self):
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.release.set)
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.parametrize("kind", sorted(CLIENTS))
def test_unreachable_server_is_an_engine_error_naming_the_url(kind):
    url = f"http://127.0.0.1:{_free_port()}"
    client = make_client(kind, url, retries=2, backoff_s=0.01, timeout_s=5)
    with pytest.raises(EngineError, match=rf"{url}.*unreachable.*after 3 attempt"):
        client.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    with pytest.raises(EngineError, match=url):
        asyncio.run(client.agenerate([1, 2], SamplingParams(max_new_tokens=2)))
    assert client.health() is False


@pytest.mark.parametrize("kind", sorted(CLIENTS))
@pytest.mark.parametrize("mode,message", [("status500", "HTTP 500: boom"), ("garbage", "not JSON"),
                                          ("wrong", "unexpected answer"), ("hang", "timed out after 0.5 s")])
def test_bad_server_answers_are_retried_then_engine_errors(kind, mode, message):
    with FakeServer(mode) as url:
        client = make_client(kind, url, retries=1, backoff_s=0.01, timeout_s=0.5, control_timeout_s=0.5)
        with pytest.raises(EngineError, match=message) as info:
            client.generate([[1, 2]], SamplingParams(max_new_tokens=2))
        assert url in str(info.value) and "after 2 attempt" in str(info.value)
        with pytest.raises(EngineError, match=message):
            asyncio.run(client.agenerate([1, 2], SamplingParams(max_new_tokens=2)))
        client.close()
