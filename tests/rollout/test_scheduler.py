"""Per-sample async scheduler: single-stream order, groups of n, concurrency, staleness, partial rollouts, retries."""

from __future__ import annotations

import asyncio
from typing import Dict, List

import pytest

from megatron_spo.rollout.agent_loop import AgentLoopConfig, generate_turn
from megatron_spo.rollout.engine import EngineError, GenerateResult, SamplingParams
from megatron_spo.rollout.reward_registry import RewardManager
from megatron_spo.rollout.sample import RolloutRequest, Sample
from megatron_spo.rollout.scheduler import RolloutScheduler, SchedulerConfig, SchedulerTimeout, ThreadedScheduler


class GatedEngine:
    """Each generation for prompt ``[k, ...]`` waits until the test opens gate ``k``.

    ``update_weights`` bumps the version and, with ``abort=True``, makes every waiting generation
    return what it has so far (2 tokens) with finish_reason "abort" at the old version.
    """

    name = "gated"

    def __init__(self, fail: Dict[int, int] = None, hang=(), bad=()):
        self.version = 0
        self.gates: Dict[int, asyncio.Event] = {}
        self.active = 0
        self.max_active = 0
        self.calls: List[List[int]] = []
        self.fail = dict(fail or {})   # prompt key -> number of EngineErrors before success (-1: forever)
        self.hang, self.bad = set(hang), set(bad)
        self._abort = asyncio.Event()

    @property
    def weight_version(self) -> int:
        return self.version

    def gate(self, k: int) -> asyncio.Event:
        return self.gates.setdefault(k, asyncio.Event())

    def update_weights(self, version: int, abort: bool = True) -> None:
        old_abort = self._abort
        self.version = version
        self._abort = asyncio.Event()
        if abort:
            old_abort.set()

    async def agenerate(self, prompt, sampling: SamplingParams) -> GenerateResult:
        k = prompt[0]
        self.calls.append(list(prompt))
        if k in self.bad:
            raise ValueError(f"prompt of {len(prompt)} tokens is longer than the context")
        if self.fail.get(k, 0) != 0:
            self.fail[k] -= 1
            raise EngineError(f"server for {k} answered 500")
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        start, abort = self.version, self._abort
        try:
            if k in self.hang:
                await asyncio.sleep(3600)
            gate = asyncio.ensure_future(self.gate(k).wait())
            ab = asyncio.ensure_future(abort.wait())
            done, pending = await asyncio.wait({gate, ab}, return_when=asyncio.FIRST_COMPLETED)
            for p in pending:
                p.cancel()
            if ab in done and not gate.done():
                return GenerateResult([100 + k, 101 + k], [-0.1, -0.2], "abort", weight_version=start)
            resumed = len(prompt) > 1
            ids = [200 + k] if resumed else [100 + k, 101 + k, 200 + k]
            return GenerateResult(ids, [-0.3] * len(ids), "stop", weight_version=self.version)
        finally:
            self.active -= 1


async def single_turn(engine, request: RolloutRequest, index: int) -> Sample:
    """A one-turn rollout built on the agent loop's turn helper (abort resume, version tags)."""
    s = Sample(uid=f"{request.uid}/{index}", request_uid=request.uid, group_index=index,
               ground_truth=request.ground_truth)
    s.prompt_ids = list(request.prompt_ids)
    ids, lps, fin = await generate_turn(engine, s.prompt_ids, SamplingParams(max_new_tokens=8), s, AgentLoopConfig())
    s.append_model_tokens(ids, lps)
    s.assistant_turns = 1
    s.response_text = " ".join(map(str, ids))
    return s


def req(k: int, n: int = 1, gt="x") -> RolloutRequest:
    return RolloutRequest(uid=f"p{k}", prompt_ids=[k], n=n, ground_truth=gt)


async def settle():
    for _ in range(20):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_single_stream_delivers_in_completion_order_without_barrier():
    async def main():
        eng = GatedEngine()
        sch = RolloutScheduler(eng, single_turn, SchedulerConfig(mode="single_stream", max_concurrency=8))
        for k in range(4):
            sch.submit(req(k))
        await settle()
        got = []
        for k in (2, 0, 3, 1):
            eng.gate(k).set()
            s = await sch.get(timeout=5)
            got.append(s.uid)
            # delivered while the others are still generating: no barrier
            assert eng.active == 4 - len(got)
        assert got == ["p2/0", "p0/0", "p3/0", "p1/0"]
        assert sch.completion_order == got
    run(main())


def test_group_mode_releases_exactly_n_when_complete():
    async def main():
        eng = GatedEngine()
        sch = RolloutScheduler(eng, lambda e, r, i: single_turn(e, RolloutRequest(
            uid=r.uid, prompt_ids=[r.prompt_ids[0] * 10 + i]), i), SchedulerConfig(mode="group", max_concurrency=16))
        sch.submit(req(1, n=3))
        sch.submit(req(2, n=3))
        await settle()
        for key in (10, 20, 21, 11):       # two of p1, two of p2: no group complete
            eng.gate(key).set()
        await settle()
        with pytest.raises(SchedulerTimeout, match="got 0 of 1 items"):
            await sch.get_batch(1, timeout=0.05)
        eng.gate(22).set()                  # completes p2 first
        g = await sch.get(timeout=5)
        assert [s.uid for s in g] == ["p2/0", "p2/1", "p2/2"]
        eng.gate(12).set()
        g = await sch.get(timeout=5)
        assert len(g) == 3 and {s.request_uid for s in g} == {"p1"} and [s.group_index for s in g] == [0, 1, 2]
    run(main())


def test_concurrency_limit_and_version_tags():
    async def main():
        eng = GatedEngine()
        sch = RolloutScheduler(eng, single_turn, SchedulerConfig(max_concurrency=3))
        for k in range(10):
            sch.submit(req(k))
            eng.gate(k)
        await settle()
        assert eng.active == 3
        for k in range(10):
            eng.gate(k).set()
        out = await sch.get_batch(10, timeout=5)
        assert eng.max_active == 3
        assert all(s.weight_versions == [0] for s in out)
        assert sch.metrics["samples_finished"] == 10
    run(main())


def test_staleness_bound_regenerates_old_samples():
    async def main():
        eng = GatedEngine()
        sch = RolloutScheduler(eng, single_turn, SchedulerConfig(max_staleness=0))
        sch.submit(req(0))
        sch.submit(req(1))
        await settle()
        eng.gate(1).set()
        s1 = await sch.get(timeout=5)                    # fresh: version 0 == current
        assert s1.weight_versions == [0]
        eng.update_weights(1, abort=False)                # p0 started at v0 and keeps going
        eng.gate(0).set()
        s0 = await sch.get(timeout=5)
        # tokens began under v0 (older than 1 - 0): dropped and regenerated under v1
        assert s0.weight_versions == [1]
        assert sch.metrics["stale_dropped"] == 1 and sch.metrics["regenerations"] == 1
        assert s0.metrics["regenerations"] == 1
        assert len([c for c in eng.calls if c[0] == 0]) == 2
    run(main())


def test_staleness_checked_again_at_hand_out():
    async def main():
        eng = GatedEngine()
        sch = RolloutScheduler(eng, single_turn, SchedulerConfig(max_staleness=1))
        sch.submit(req(0))
        eng.gate(0).set()
        await settle()
        assert sch.ready == 1                             # finished at v0, waiting in the queue
        eng.update_weights(2, abort=False)                # now 0 < 2 - 1: stale at hand-out
        s = await sch.get(timeout=5)
        assert s.weight_versions == [2] and sch.metrics["stale_dropped"] == 1
    run(main())


def test_partial_rollout_resumed_across_weight_update():
    async def main(bound):
        eng = GatedEngine()
        sch = RolloutScheduler(eng, single_turn, SchedulerConfig(max_staleness=bound))
        sch.submit(req(5))
        await settle()
        eng.update_weights(1, abort=True)                 # in-flight generation aborted with 2 partial tokens
        await settle()
        eng.gate(5).set()
        return await sch.get(timeout=5), sch, eng

    s, sch, eng = run(main(1))
    assert eng.calls == [[5], [5, 105, 106]]              # resumed from the partial tokens
    assert s.response_ids == [105, 106, 205]
    assert s.rollout_logprobs == [-0.1, -0.2, -0.3]       # partial tokens keep their own log-probs
    assert s.weight_versions == [0, 1] and s.metrics["aborts"] == 1
    assert sch.metrics["stale_dropped"] == 0

    s, sch, eng = run(main(0))                            # bound 0: the v0 prefix is too old
    assert s.weight_versions == [1] and s.response_ids == [105, 106, 205]
    assert sch.metrics["stale_dropped"] == 1
    assert eng.calls == [[5], [5, 105, 106], [5]]


def test_engine_error_retried_then_reported_per_sample():
    async def main():
        eng = GatedEngine(fail={1: 1, 2: -1})             # p1 fails once, p2 always
        sch = RolloutScheduler(eng, single_turn, SchedulerConfig(max_retries=2))
        for k in range(3):
            sch.submit(req(k))
            eng.gate(k).set()
        out = {s.request_uid: s for s in await sch.get_batch(3, timeout=5)}
        return out, sch, eng

    out, sch, eng = run(main())
    assert out["p0"].ok and out["p1"].ok and out["p1"].metrics["retries"] == 1
    bad = out["p2"]
    assert not bad.ok and bad.finish_reason == "error" and bad.reward == 0.0
    assert "p2/0: failed after 2 retries; last: EngineError: server for 2 answered 500" in bad.errors[0]
    assert len([c for c in eng.calls if c[0] == 2]) == 3
    assert sch.metrics["retries"] == 3 and sch.metrics["sample_errors"] == 1


def test_hung_rollout_times_out_and_bad_input_fails_fast():
    async def main():
        eng = GatedEngine(hang={1}, bad={2})
        sch = RolloutScheduler(eng, single_turn, SchedulerConfig(max_retries=1, sample_timeout_s=0.1))
        for k in range(3):
            sch.submit(req(k))
            eng.gate(k).set()
        out = {s.request_uid: s for s in await sch.get_batch(3, timeout=10)}
        return out, sch, eng

    out, sch, eng = run(main())
    assert out["p0"].ok
    assert "rollout timed out after 0.1s" in out["p1"].errors[0] and sch.metrics["timeouts"] == 2
    assert "ValueError: prompt of 1 tokens is longer than the context" in out["p2"].errors[0]
    assert len([c for c in eng.calls if c[0] == 2]) == 1  # not retried


def test_get_batch_never_hangs():
    async def main():
        eng = GatedEngine()
        sch = RolloutScheduler(eng, single_turn)
        sch.submit(req(0))
        eng.gate(0).set()
        with pytest.raises(RuntimeError, match="asked for 2 items but only 1 are ready and nothing is in flight"):
            await sch.get_batch(2, timeout=5)
        assert (await sch.get(timeout=5)).uid == "p0/0"   # the collected item was kept
        sch.submit(req(1))                                 # gate never opens
        with pytest.raises(SchedulerTimeout, match="1 rollouts in flight"):
            await sch.get_batch(1, timeout=0.05)
        await sch.aclose()
        assert sch.in_flight == 0
    run(main())


def test_reward_fn_runs_per_sample_and_raising_one_counts():
    def reward(response, ground_truth):
        if ground_truth == "boom":
            raise KeyError("no answer")
        return 1.0

    async def main():
        eng = GatedEngine()
        mgr = RewardManager(reward)
        sch = RolloutScheduler(eng, single_turn, reward_fn=mgr)
        sch.submit(req(0, gt="ok"))
        sch.submit(req(1, gt="boom"))
        eng.gate(0).set()
        eng.gate(1).set()
        out = {s.request_uid: s for s in await sch.get_batch(2, timeout=5)}
        return out, mgr

    out, mgr = run(main())
    assert out["p0"].reward == 1.0 and out["p1"].reward == 0.0
    assert mgr.metrics["reward/errors"] == 1 and out["p1"].metrics["reward_errors"] == 1


def test_threaded_scheduler_sync_api():
    async def rollout(engine, request, index):
        await asyncio.sleep(0.01 * (3 - request.prompt_ids[0]))   # later prompts finish first
        s = Sample(uid=f"{request.uid}/{index}", request_uid=request.uid, weight_versions=[0])
        return s

    class Eng:
        weight_version = 0

    ts = ThreadedScheduler(Eng(), rollout, SchedulerConfig(max_concurrency=4))
    try:
        ts.submit([req(k) for k in range(3)])
        out = ts.get_batch(3, timeout=10)
        assert [s.uid for s in out] == ["p2/0", "p1/0", "p0/0"]
        assert ts.metrics["samples_finished"] == 3
    finally:
        ts.close()


def test_duplicate_uid_rejected():
    async def main():
        sch = RolloutScheduler(GatedEngine(), single_turn)
        sch.submit(req(0))
        with pytest.raises(ValueError, match="'p0' is already in flight"):
            sch.submit(req(0))
        await sch.aclose()
    run(main())


def test_spo_agent_loop_through_scheduler_with_strict_reward():
    from megatron_spo.models.tiny import make_tiny_tokenizer
    from megatron_spo.rollout.agent_loop import SPOCodeAgentLoop

    tok = make_tiny_tokenizer()
    turns = ["<think>compute<code>\n```python\n6 * 7\n```\n</code>",
             "</think>The answer is \\boxed{42}.<|im_end|>"]
    interp = tok.convert_tokens_to_ids("<interpreter>")

    class Scripted:
        name, weight_version = "scripted", 4

        async def agenerate(self, prompt, sampling):
            # the instruction mentions <interpreter> once; a second one is the tool output
            ids = tok.encode(turns[1 if list(prompt).count(interp) > 1 else 0], add_special_tokens=False)
            return GenerateResult(ids, [-0.5] * len(ids), "stop", weight_version=4)

    class Tool:
        async def run(self, code):
            assert code == "print(6 * 7)"
            return "42\n"

    loop = SPOCodeAgentLoop(tok, Tool())

    async def main():
        sch = RolloutScheduler(Scripted(), loop.run, SchedulerConfig(mode="group"),
                               reward_fn=RewardManager("spo_strict_boxed"))
        sch.submit(RolloutRequest(uid="q", messages=[{"role": "user", "content": "6 times 7?"}], ground_truth="42", n=2))
        return await sch.get(timeout=20)

    group = run(main())
    assert [s.uid for s in group] == ["q/0", "q/1"]
    for s in group:
        assert s.reward == 1.0 and s.finish_reason == "stop"
        assert "<interpreter>\n42\n\n</interpreter>" in s.response_text
        assert s.weight_versions == [4, 4] and s.key == "6 times 7?" and s.num_turns == 4


def test_bare_reward_fn_that_raises_never_kills_the_run():
    def reward(sample):
        raise RuntimeError("grader crashed")

    async def main():
        eng = GatedEngine()
        sch = RolloutScheduler(eng, single_turn, reward_fn=reward)
        for k in range(2):
            sch.submit(req(k))
            eng.gate(k).set()
        return await sch.get_batch(2, timeout=5), sch

    out, sch = run(main())
    assert [s.reward for s in out] == [0.0, 0.0]
    assert sch.metrics["sample/reward_errors"] == 2
    assert "reward: RuntimeError: grader crashed" in out[0].errors


def test_group_member_stale_at_hand_out_is_regenerated_alone():
    async def main():
        eng = GatedEngine()
        sch = RolloutScheduler(eng, lambda e, r, i: single_turn(e, RolloutRequest(
            uid=r.uid, prompt_ids=[10 + i]), i), SchedulerConfig(mode="group", max_staleness=1, max_concurrency=1))
        sch.submit(req(1, n=2))
        await settle()                       # member 0 generating at v0; one slot, member 1 waits
        eng.update_weights(1, abort=False)
        eng.gate(10).set()
        await settle()                       # member 0 done (tagged v0, fresh at v1); member 1 starts at v1
        eng.gate(11).set()
        await settle()
        assert sch.ready == 1
        eng.update_weights(2, abort=False)   # bound 1: v0 is stale, v1 is not
        g = await sch.get(timeout=5)
        return g, sch, eng

    g, sch, eng = run(main())
    assert [s.group_index for s in g] == [0, 1]
    assert [s.weight_versions for s in g] == [[2], [1]]
    assert sch.metrics["stale_dropped"] == 1 and eng.calls == [[10], [11], [10]]


def test_hanging_reward_times_out_without_stalling_other_samples():
    import time as _time

    def reward(sample):
        if sample.request_uid == "p0":
            _time.sleep(1.0)           # a grader stuck on one answer (thread is left to finish)
        sample.reward = 1.0

    async def main():
        eng = GatedEngine()
        sch = RolloutScheduler(eng, single_turn, SchedulerConfig(reward_timeout_s=0.2), reward_fn=reward)
        for k in range(3):
            sch.submit(req(k))
            eng.gate(k).set()
        out = await sch.get_batch(3, timeout=5)
        await asyncio.sleep(1.2)        # the stuck grader finishes late ...
        await sch.aclose()
        return out, sch

    out, sch = run(main())
    by = {s.request_uid: s for s in out}
    assert by["p1"].reward == 1.0 and by["p2"].reward == 1.0
    assert by["p0"].reward == 0.0 and "reward: timed out after 0.2s" in by["p0"].errors  # ... and changes nothing
    assert sch.metrics["reward_timeouts"] == 1
    assert [s.request_uid for s in out][-1] == "p0"   # the others were not held behind it
