"""Load: N concurrent PyPI-client requests against a concurrency-2 server; all answered, none lost or mixed up."""

from __future__ import annotations

import asyncio

import pytest
from sandbox_fusion import RunCodeRequest, RunStatus, run_code_async

from megatron_spo.sandbox.client import SandboxClient


async def _burst(url: str, n: int):
    async def one(i: int):
        # Each request prints its own id (and a derived value) and sleeps a little so runs overlap in the slots.
        code = f"import time\ntime.sleep(0.01)\nprint({i}, {i} * 7 + 1)"
        # max_attempts=1: a lost request must show up as a failure, not be papered over by a retry.
        return await run_code_async(RunCodeRequest(code=code, language="python", run_timeout=30),
                                    endpoint=url, max_attempts=1, client_timeout=600)

    return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


def _check_burst(server, n: int) -> None:
    served_before = server.health()["served"]
    results = asyncio.run(_burst(server.url, n))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], errors[:3]
    assert len(results) == n
    for i, resp in enumerate(results):
        assert resp.status == RunStatus.Success, (i, resp)
        assert resp.run_result.stdout == f"{i} {i * 7 + 1}\n", (i, resp.run_result.stdout)
    health = server.health()
    assert health["served"] - served_before == n  # every request ran exactly once
    assert health["running"] == 0 and health["queued"] == 0


def test_load_40_concurrent(server):
    _check_burst(server, 40)


@pytest.mark.slow
def test_load_200_concurrent(server):
    # 13 s on the 2 shared cores when quiet, 26 s under load 14: slow-marked, the 40-request one stays default.
    _check_burst(server, 200)


def test_our_async_client_concurrent(server):
    async def main():
        async with SandboxClient(server.url, max_attempts=1) as client:
            assert (await client.health())["concurrency"] == 2
            return await asyncio.gather(*(client.run_code(f"print('id', {i})") for i in range(20)))

    for i, resp in enumerate(asyncio.run(main())):
        assert resp["status"] == "Success" and resp["run_result"]["stdout"] == f"id {i}\n"
