"""Rewards in worker processes: a reward that never returns is 0 within the hard timeout, counted and logged
with the sample uid, its worker replaced; the pool keeps working; math-verify on a tower of exponents returns."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from megatron_spo.config import RolloutConfig
from megatron_spo.data import PromptRecord
from megatron_spo.models.tiny import make_tiny_tokenizer
from megatron_spo.rollout.engine import GenerateResult, SamplingParams
from megatron_spo.rollout.phase import RolloutPhase
from megatron_spo.rollout.reward_pool import DEFAULT_TIMEOUT_S, RewardPool
from megatron_spo.rollout.reward_registry import REWARD_FNS, RewardManager, register_reward
from megatron_spo.rollout.rewards import math_verify_score
from megatron_spo.rollout.sample import Sample

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the workers get this sys.path too
from _slow_rewards import exits_hard, loops_forever, sleeps_forever, with_sample  # noqa: E402


register_reward("test_loops_forever")(loops_forever)


def _sample(text, gt="5", uid="u/0", n_tokens=4):
    s = Sample(uid=uid, request_uid=uid.split("/")[0], response_text=text, ground_truth=gt)
    s.append_model_tokens(list(range(n_tokens)), [0.0] * n_tokens)
    return s


def test_default_timeout_leaves_room_for_a_preempted_checkpoint():
    assert DEFAULT_TIMEOUT_S <= 10.0
    assert RewardManager("math_verify").pool.timeout_s == DEFAULT_TIMEOUT_S
    assert RewardManager("spo_strict_boxed").pool is None          # bounded string work: in the calling thread
    assert RewardManager(lambda r, g: 1.0).pool is None             # function objects: as before


def test_reward_that_never_returns_is_zero_within_the_timeout_and_the_pool_keeps_working(caplog):
    mgr = RewardManager("test_loops_forever", timeout_s=1.0)
    assert mgr.pool is not None
    try:
        assert mgr(_sample("fine")) == 1.0                           # boots the first worker
        stuck = _sample("hang", uid="s7-3/0")
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="megatron_spo.rollout.reward_registry"):
            assert mgr(stuck) == 0.0
        assert time.monotonic() - start < 6.0          # the reward itself would never return
        assert stuck.reward == 0.0 and stuck.metrics["reward_timeouts"] == 1
        assert stuck.errors == ["reward test_loops_forever: timed out after 1s (worker killed)"]
        assert "s7-3/0" in caplog.text and "timed out" in caplog.text
        assert mgr.metrics["reward/timeouts"] == 1 and mgr.metrics["reward/errors"] == 0
        assert [mgr(_sample("fine")) for _ in range(3)] == [1.0, 1.0, 1.0]   # a fresh worker took over
        assert mgr.pool.started == 2
    finally:
        mgr.close()
        REWARD_FNS.pop("test_loops_forever", None)


def test_concurrent_stuck_calls_do_not_hold_the_others():
    import concurrent.futures

    mgr = RewardManager(sleeps_forever, isolate=True, timeout_s=1.0, workers=3)
    try:
        texts = ["hang", "ok", "ok", "hang", "ok", "ok"]
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            got = list(ex.map(lambda t: mgr(_sample(t)), texts))
        assert got == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
        assert time.monotonic() - start < 10.0 and mgr.metrics["reward/timeouts"] == 2
    finally:
        mgr.close()


def test_one_caller_keeps_one_process_and_concurrent_callers_share_the_pool():
    import concurrent.futures

    mgr = RewardManager(exits_hard, isolate=True, workers=3)
    try:
        mgr.prestart()
        assert mgr.pool.started == 1
        assert [mgr(_sample("fine")) for _ in range(200)] == [0.5] * 200
        assert mgr.pool.started == 1          # a caller that never waits never gets a second worker
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            assert list(ex.map(lambda _: mgr(_sample("fine")), range(200))) == [0.5] * 200
        assert mgr.pool.started <= 3          # more only after a 50 ms wait, and never above `workers`
    finally:
        mgr.close()


def test_worker_crash_is_an_error_and_kwargs_rewards_get_the_sample():
    mgr = RewardManager(exits_hard, isolate=True)
    try:
        bad = _sample("die")
        assert mgr(bad) == 0.0 and mgr.metrics["reward/errors"] == 1
        assert bad.errors == ["reward exits_hard: RewardWorkerError: worker exited with code 3"]
        assert mgr(_sample("fine")) == 0.5
    finally:
        mgr.close()
    with RewardManager(with_sample, isolate=True).pool as pool:
        assert pool.call("x", "1", _sample("x", n_tokens=7)).value == {"score": 0.7}


def test_worker_ignores_the_trainers_signals_and_dies_when_closed():
    with RewardPool("_slow_rewards:sleeps_forever", timeout_s=5.0) as pool:
        assert pool.call("ok", "1").kind == "ok"
        (worker,) = pool._idle
        os.kill(worker.popen.pid, signal.SIGTERM)       # Slurm signals the whole process group
        os.kill(worker.popen.pid, signal.SIGUSR1)
        time.sleep(0.2)
        assert worker.popen.poll() is None and pool.call("ok", "1").value == 1.0
    assert worker.popen.poll() is not None


def test_local_functions_cannot_be_isolated():
    def local(response, ground_truth):
        return 1.0

    with pytest.raises(ValueError, match="reward local: cannot run in a worker process"):
        RewardManager(local, isolate=True)


def test_math_verify_on_a_tower_of_exponents_returns_within_the_timeout():
    # In its worker math-verify runs in the main thread, where its own SIGALRM limit (5 s) works ...
    mgr = RewardManager("math_verify")
    try:
        assert mgr(_sample("so \\boxed{5}")) == 1.0
        start = time.monotonic()
        assert mgr(_sample("so \\boxed{9^{9^{9^{9^{9}}}}}")) == 0.0
        assert time.monotonic() - start < DEFAULT_TIMEOUT_S + 2.0    # its own limit, or the hard one
        assert mgr(_sample("so \\boxed{\\frac{10}{2}}")) == 1.0        # still working
    finally:
        mgr.close()
    # ... and the hard limit ends it wherever it is (here before math-verify's own limit)
    mgr = RewardManager("math_verify", timeout_s=1.5)
    try:
        start = time.monotonic()
        assert mgr(_sample("so \\boxed{((100!)!)!}")) == 0.0 and mgr.metrics["reward/timeouts"] == 1
        assert time.monotonic() - start < 6.0
        assert mgr(_sample("so \\boxed{5}")) == 1.0
    finally:
        mgr.close()
    assert math_verify_score("so \\boxed{5}", "5") == 1.0


class OneTurnEngine:
    """Answers ``\\boxed{hang}`` to a prompt that mentions 'hang', else ``\\boxed{2}``."""

    name = "one-turn"
    weight_version = 0

    def __init__(self, tok):
        self.tok = tok

    async def agenerate(self, prompt, sampling: SamplingParams, request_id=None) -> GenerateResult:
        text = "\\boxed{hang}" if "hang" in self.tok.decode(prompt) else "\\boxed{2}"
        ids = self.tok.encode(text + "<|im_end|>", add_special_tokens=False)
        return GenerateResult(ids, [-0.5] * len(ids), "stop", 0, len(prompt))


def test_phase_counts_reward_timeouts_and_finishes():
    tok = make_tiny_tokenizer()
    recs = [PromptRecord(index=i, messages=[{"role": "user", "content": q}], answer="2", key=q)
            for i, q in enumerate(["What is 1+1?", "please hang", "What is 0+2?"])]
    mgr = RewardManager(sleeps_forever, isolate=True, timeout_s=1.0)
    try:
        with RolloutPhase(OneTurnEngine(tok), tok, RolloutConfig(agent="single_turn", max_response_len=16),
                          reward=mgr) as phase:
            start = time.monotonic()
            batch = phase.run(recs, 2)
            assert time.monotonic() - start < 10.0
            clean = phase.run(recs[:1], 1)
        assert [s.reward for s in batch.samples] == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
        assert batch.metrics["rollout/reward_timeouts"] == 2 and batch.metrics["rollout/reward_errors"] == 0
        assert "rollout/reward_timeouts" not in clean.metrics      # a step without any logs no new key
        assert mgr.pool._idle                                     # the phase does not close a manager it was given
    finally:
        mgr.close()
