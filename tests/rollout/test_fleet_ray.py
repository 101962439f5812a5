"""Ray-placed fleet: a Ray actor per server; a server killed mid-rollout loses no sample and is restarted.

Slow (Ray start-up plus two server processes on 2 busy cores); the same fleet logic over plain
local subprocesses runs in the default suite (test_fleet.py).
"""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

from megatron_spo.models.tiny import make_tiny_model_dir
from megatron_spo.rollout.engine import SamplingParams
from megatron_spo.rollout.fleet import Fleet

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pytestmark = pytest.mark.slow


def test_ray_fleet_kill_mid_rollout_exactly_once_and_restart(tmp_path):
    model_dir = str(make_tiny_model_dir(tmp_path / "m", "qwen3"))
    fleet = Fleet.ray(model_dir, 2, client_kwargs={"timeout_s": 60, "retries": 1, "backoff_s": 0.05},
                      ray_kwargs={"num_cpus": 0.5, "ray_init": {"num_cpus": 2}}, health_interval_s=0.5)
    try:
        launcher = fleet.launcher
        first_actor = launcher.actors[0]
        n = 16
        sp = SamplingParams(max_new_tokens=240, ignore_eos=True)  # near the 256-token context: long enough that the kill lands mid-generation
        arrived = collections.Counter()

        async def rollout():
            async def one(i):
                res = await fleet.agenerate([5, 6 + i % 3], sp, request_id=f"s{i}")
                arrived[res.meta["request_id"]] += 1
                return res

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            t0 = time.monotonic()
            while fleet.endpoints[0].inflight == 0 and time.monotonic() - t0 < 60:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert fleet.endpoints[0].inflight > 0
            launcher.kill(0)  # the server process dies; its actor survives
            return await asyncio.gather(*tasks)

        results = asyncio.run(rollout())
        assert arrived == collections.Counter({f"s{i}": 1 for i in range(n)})
        assert all(len(r.token_ids) == 240 for r in results) and fleet.retries >= 1

        t0 = time.monotonic()
        while not (fleet.endpoints[0].incarnation == 1 and fleet.endpoints[0].healthy) and time.monotonic() - t0 < 180:
            time.sleep(0.2)
        assert fleet.endpoints[0].healthy and launcher.actors[0] is first_actor  # restarted inside its actor

        launcher.kill_actor(1)  # losing the actor (a node) replaces it with a new actor
        t0 = time.monotonic()
        while not (fleet.endpoints[1].incarnation == 1 and fleet.endpoints[1].healthy) and time.monotonic() - t0 < 180:
            time.sleep(0.2)
        assert fleet.endpoints[1].healthy and fleet.restarts == 2
        more = fleet.generate([[1, 2], [3, 4], [5, 6], [7, 8]], SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert {r.meta["endpoint"] for r in more} == {ep.name for ep in fleet.endpoints}
    finally:
        fleet.close()
        ray.shutdown()
