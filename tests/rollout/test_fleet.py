"""Fleet: least-loaded routing, retries elsewhere, exactly-once delivery, supervision and restarts."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest
import torch

from megatron_spo.models.tiny import make_tiny_model_dir
from megatron_spo.rollout.embedded.engine import EmbeddedEngine
from megatron_spo.rollout.engine import EngineError, GenerateResult, RequestError, SamplingParams
from megatron_spo.rollout.fleet import Fleet


class FakeEngine:
    """An endpoint double: fixed latency, optional failure, records the attempt ids it saw."""

    name = "fake"

    def __init__(self, latency: float, fail: bool = False, bad_request: bool = False):
        self.latency, self.fail, self.bad_request = latency, fail, bad_request
        self.seen, self.version, self.healthy = [], 0, True

    async def agenerate(self, prompt, sampling, request_id=None):
        self.seen.append(request_id)
        await asyncio.sleep(self.latency)
        if self.bad_request:
            raise RequestError("prompt too long")
        if self.fail:
            raise EngineError("http://fake: HTTP 500")
        return GenerateResult([prompt[0]], [-0.5], "length", self.version, len(prompt))

    def update_weights(self, source, version):
        if self.fail:
            raise EngineError("http://fake: unreachable")
        self.version = version

    def health(self):
        return self.healthy and not self.fail

    def pause(self):
        pass

    def resume(self):
        pass


def run_all(fleet, n, prefix="r"):
    async def go():
        return await asyncio.gather(*[fleet.agenerate([i], SamplingParams(), request_id=f"{prefix}{i}")
                                      for i in range(n)])
    return asyncio.run(go())


def test_least_loaded_routing_balances_and_prefers_the_fast_endpoint():
    a, b = FakeEngine(0.02), FakeEngine(0.02)
    fleet = Fleet([a, b], health_interval_s=0)
    run_all(fleet, 20)
    assert len(a.seen) == 10 and len(b.seen) == 10
    fast, slow = FakeEngine(0.01), FakeEngine(0.2)
    fleet = Fleet([slow, fast], health_interval_s=0)

    async def trickle():  # 4 concurrent workers, 40 requests: the fast endpoint frees up sooner
        queue = list(range(40))

        async def worker():
            while queue:
                i = queue.pop()
                await fleet.agenerate([i], SamplingParams(), request_id=f"t{i}")
        await asyncio.gather(*[worker() for _ in range(4)])

    asyncio.run(trickle())
    assert len(fast.seen) > 3 * len(slow.seen)


def test_failed_endpoint_requests_are_retried_elsewhere_exactly_once():
    bad, good = FakeEngine(0.01, fail=True), FakeEngine(0.01)
    fleet = Fleet([bad, good], health_interval_s=0)
    results = run_all(fleet, 12)
    ids = [r.meta["request_id"] for r in results]
    assert sorted(ids) == sorted(f"r{i}" for i in range(12))
    assert set(fleet.delivered.values()) == {1} and len(fleet.delivered) == 12
    assert all(r.token_ids == [i] for i, r in enumerate(results))
    assert len(bad.seen) >= 1 and fleet.retries == len(bad.seen)
    assert all(s.endswith("#0") for s in bad.seen)  # attempts carry their own id
    assert all(r.meta["endpoint"] == "fake[1]" for r in results)
    assert fleet.endpoints[0].healthy is False
    with pytest.raises(RequestError, match="already delivered"):
        run_all(fleet, 1)


def test_request_errors_are_not_retried_and_no_endpoint_fails_fast():
    fleet = Fleet([FakeEngine(0.0, bad_request=True), FakeEngine(0.0)], health_interval_s=0)
    with pytest.raises(RequestError, match="prompt too long"):
        asyncio.run(fleet.agenerate([1], SamplingParams(), request_id="x"))
    assert fleet.retries == 0
    dead = Fleet([FakeEngine(0.0, fail=True)], health_interval_s=0, wait_for_endpoint_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"request y: failed after 2 attempt\(s\): fake\[0\]: .*HTTP 500 \| "
                                          r"no usable endpoint within 0.2 s"):
        asyncio.run(dead.agenerate([1], SamplingParams(), request_id="y"))
    assert time.monotonic() - t0 < 10


def test_endpoints_that_miss_a_weight_update_leave_the_rotation():
    a, b = FakeEngine(0.0), FakeEngine(0.0)
    fleet = Fleet([a, b], health_interval_s=0)
    b.fail = True
    fleet.update_weights([[("w", torch.zeros(1))]], version=4)
    b.fail = False
    fleet.endpoints[1].healthy = True  # healthy again, but still on version 0
    results = run_all(fleet, 6)
    assert {r.weight_version for r in results} == {4} and len(b.seen) == 0


def test_fleet_over_the_embedded_engine(tmp_path):
    engine = EmbeddedEngine(str(make_tiny_model_dir(tmp_path / "m", "qwen3")))
    fleet = Fleet([engine], health_interval_s=0)
    res = fleet.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert [len(r.token_ids) for r in res] == [4, 4] and fleet.health()
    engine.close()


def test_killing_one_of_two_servers_mid_rollout_delivers_every_sample_exactly_once(tmp_path):
    """Two real HTTP server subprocesses; one is SIGKILLed while it has requests in flight."""
    from transformers import AutoModelForCausalLM

    dir_a = str(make_tiny_model_dir(tmp_path / "a", "qwen3", seed=0))
    dir_b = str(make_tiny_model_dir(tmp_path / "b", "qwen3", seed=1))
    fleet = Fleet.local(dir_a, 2, client_kwargs={"timeout_s": 60, "retries": 1, "backoff_s": 0.05},
                        health_interval_s=0.5)
    try:
        fleet.update_weights(dir_b, version=1)  # a restarted server must come back on these weights
        n, new_tokens = 24, 240  # (context 256) long enough that server 0 is still decoding when it is killed
        sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        arrived = collections.Counter()

        async def rollout():
            async def one(i):
                res = await fleet.agenerate([3 + i % 5, 7, 11], sp, request_id=f"s{i}")
                arrived[res.meta["request_id"]] += 1
                return res

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            t0 = time.monotonic()
            while fleet.endpoints[0].inflight == 0 and time.monotonic() - t0 < 60:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # let server 0 receive its share
            assert fleet.endpoints[0].inflight > 0
            fleet.launcher.kill(0)
            return await asyncio.gather(*tasks)

        results = asyncio.run(rollout())
        assert arrived == collections.Counter({f"s{i}": 1 for i in range(n)})
        assert all(r.finish_reason == "length" and len(r.token_ids) == new_tokens for r in results)
        assert fleet.retries >= 1 and any(r.meta["attempts"] == 2 for r in results)
        new_model = AutoModelForCausalLM.from_pretrained(dir_b, dtype=torch.float32).eval()
        r = results[0]
        with torch.no_grad():
            logits = new_model(torch.tensor([[3, 7, 11] + r.token_ids])).logits[0]
        ref = torch.log_softmax(logits.double(), -1)[2:-1].gather(-1, torch.tensor(r.token_ids)[:, None]).squeeze(-1)
        assert r.weight_version == 1 and (ref - torch.tensor(r.logprobs, dtype=torch.float64)).abs().max() <= 1e-5

        # the supervisor restarts server 0, resyncs it to version 1 from disk, and routes to it again
        t0 = time.monotonic()
        while not (fleet.endpoints[0].incarnation == 1 and fleet.endpoints[0].healthy) and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        assert fleet.restarts == 1 and fleet.endpoints[0].healthy and fleet.endpoints[0].version == 1
        more = run_all(fleet, 6, prefix="after")
        assert {r.meta["endpoint"] for r in more} == {ep.name for ep in fleet.endpoints}
        assert {r.weight_version for r in more} == {1}
    finally:
        fleet.close()


def test_fleet_from_config_picks_the_endpoints(tmp_path):
    from megatron_spo.config import RolloutConfig
    from megatron_spo.rollout.build import fleet_from_config
    from megatron_spo.rollout.sglang_client import SGLangClient
    from megatron_spo.rollout.vllm_client import VLLMClient

    fleet = fleet_from_config(RolloutConfig(engine="vllm", urls=["http://127.0.0.1:1", "http://127.0.0.1:2"],
                                            request_timeout_s=7.0), str(tmp_path), health_interval_s=0)
    assert [type(ep.engine) for ep in fleet.endpoints] == [VLLMClient, VLLMClient]
    assert [ep.name for ep in fleet.endpoints] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert fleet.endpoints[0].engine.timeout_s == 7.0
    fleet = fleet_from_config(RolloutConfig(engine="sglang", urls=["http://127.0.0.1:3"]), str(tmp_path),
                              health_interval_s=0)
    assert isinstance(fleet.endpoints[0].engine, SGLangClient)
