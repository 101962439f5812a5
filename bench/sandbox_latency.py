"""P7: latency of an isolated ``print(1+1)`` over a bare ``python -c`` spawn, side by side in one run.

Rows (the same interpreter everywhere, interleaved round by round so machine noise hits every row alike):

* bare                ``asyncio.create_subprocess_exec(python, "-c", "print(1+1)")``, stdout piped, waited.
* isolated, warm      the server's runner as ``serve`` uses it, on a slot whose sandbox is ready (the warm
                      pool started it after the slot's previous run): request parsing, frame delivery to a
                      sandbox with all namespaces, private tmpfs, slot uid, rlimits, cgroup v1 when available,
                      capped pipe reads, the post-run sweep of the slot, the SandboxFusion response dict.
* isolated, cold      the same with ``--no-warm-pool``: the sandbox is started by the request.
* cold, no cgroup     ``--no-warm-pool --no-cgroup``.
* warm + HTTP         the warm row through the aiohttp server and our async client.
* warm, back to back  requests on one slot with no gap: each waits for its sandbox to finish starting. The warm
                      pool hides the start-up from a request that finds its slot ready; it does not make the
                      start-up cheaper, so a saturated slot pays it (about the cold cost).

The headline ``ratio`` is isolated, warm / bare (medians): what a tool call costs over running the code bare
when the server has a ready slot. Run as root for the per-slot uid and cgroups (as the server does);
otherwise those layers are off and the first line says so.

    python bench/sandbox_latency.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import sys
import asyncio
import dataclasses
import socket
import statistics
import time

from aiohttp import web

from megatron_spo.sandbox import api
from megatron_spo.sandbox.client import SandboxClient
from megatron_spo.sandbox.runner import Runner
from megatron_spo.sandbox.server import SandboxServer, ServerConfig, build_runner

CODE = "print(1+1)"


async def bare(python: str) -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(python, "-c", CODE, stdout=asyncio.subprocess.PIPE,
                                                stdin=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    dt = time.perf_counter() - t0
    assert out == b"2\n", out
    return dt


async def isolated(runner: Runner, limits: api.Limits) -> float:
    t0 = time.perf_counter()
    resp = await runner.run(api.parse_request({"code": CODE, "language": "python"}, limits), 0)
    dt = time.perf_counter() - t0
    assert resp["run_result"]["stdout"] == "2\n", resp
    return dt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main(rounds: int, warmup: int) -> None:
    cfg = ServerConfig(concurrency=1, uid_base=61400)
    server = SandboxServer(cfg)
    warm = server.runner
    # Own uids and cgroups: a runner's post-run sweep kills every process of its slot's uid and cgroup.
    cold, _ = build_runner(dataclasses.replace(cfg, uid_base=61410, warm_pool=False))
    cold_no_cg, _ = build_runner(dataclasses.replace(cfg, uid_base=61420, warm_pool=False, use_cgroup=False))
    port = _free_port()
    app_runner = web.AppRunner(server.app())
    await app_runner.setup()  # runs the start-up self-test and starts the warm pool
    site = web.TCPSite(app_runner, "127.0.0.1", port)
    await site.start()

    summary = server.isolation_summary()
    names = ["bare python -c", "isolated, warm", "isolated, cold", "cold, no cgroup", "warm + HTTP",
             "warm, back to back"]
    times = {name: [] for name in names}
    try:
        async with SandboxClient(f"http://127.0.0.1:{port}", max_attempts=1) as client:

            async def http() -> float:
                t0 = time.perf_counter()
                resp = await client.run_code(CODE)
                dt = time.perf_counter() - t0
                assert resp["run_result"]["stdout"] == "2\n", resp
                return dt

            async def ready_then(fn):  # a request that finds its slot's sandbox ready
                await warm.wait_warm([0])
                return await fn()

            async def back_to_back() -> float:  # the previous request on this slot has just finished
                await warm.wait_warm([0])
                await isolated(warm, cfg.limits)
                return await isolated(warm, cfg.limits)

            fns = [lambda: bare(cfg.python), lambda: ready_then(lambda: isolated(warm, cfg.limits)),
                   lambda: isolated(cold, cfg.limits), lambda: isolated(cold_no_cg, cfg.limits),
                   lambda: ready_then(http), back_to_back]
            for r in range(warmup + rounds):
                for name, fn in zip(names, fns):
                    dt = await fn()
                    if r >= warmup:
                        times[name].append(dt)
    finally:
        await app_runner.cleanup()
        for r in (cold, cold_no_cg):
            await r.close()
            if r.config.cgroup is not None:
                r.config.cgroup.teardown()

    print(f"isolation: {summary}  python: {cfg.python}  rounds: {rounds}")
    print(f"{'case':<20} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'/ bare':>7}")
    bare_m = statistics.median(times[names[0]])
    for name, ts in times.items():
        ts = sorted(ts)
        p90 = ts[min(len(ts) - 1, int(0.9 * len(ts)))]
        med = statistics.median(ts)
        print(f"{name:<20} {med * 1e3:>10.1f} {p90 * 1e3:>8.1f} {ts[0] * 1e3:>8.1f} {med / bare_m:>7.2f}")
    print(f"ratio: {statistics.median(times['isolated, warm']) / bare_m:.2f}")


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]  # smaller defaults; flags given explicitly still win
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run well under 3 minutes: 10 rounds")
    ap.add_argument("--rounds", type=int, default=10 if quick else 40)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    asyncio.run(main(a.rounds, a.warmup))
