"""P7: latency of an isolated ``print(1+1)`` over a bare ``python -c`` spawn, side by side in one run.

Rows (all the same interpreter, interleaved round by round so machine noise hits every row alike):

* bare         ``asyncio.create_subprocess_exec(python, "-c", "print(1+1)")`` with piped stdout, waited.
* isolated     the sandbox runner exactly as the server uses it: request parsing, memfd files, bwrap
               (all namespaces, ro root, tmpfs work dir), slot uid, rlimits, cgroup v1 when available,
               capped pipe reads, the post-run process sweep, the SandboxFusion response dict.
* isolated, no cgroup  the same runner without the cgroup layer (``serve --no-cgroup``).
* isolated+HTTP  the same through the aiohttp server and our async client (adds HTTP + JSON, not isolation).

The headline ``ratio`` is isolated / bare (median): the cost of isolation itself. Run as root for the
per-slot uid and cgroups (as the server does); otherwise those layers are off and the table says so.

    python bench/sandbox_latency.py [--rounds 40]

Where the time goes (measured on the 2-core shared dev box under load 5-8, medians): bwrap with all
namespaces adds ~15 ms over a ~30 ms bare spawn (one extra fork for bwrap's pid 1 plus user/net/mount/pid
namespace setup); running inside the per-slot cgroup v1 memory/pids groups adds ~5-10 ms (page charging
and accounting; not the attach: spawning from a process already inside the cgroup measured the same).
``serve --no-cgroup`` (the extra row) removes the latter at the price of the per-tree memory bound. On a quiet machine spec §4 measured bwrap + setuid + rlimits at 1.14x.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import socket
import statistics
import time

from aiohttp import web

from megatron_spo.sandbox import api
from megatron_spo.sandbox.client import SandboxClient
from megatron_spo.sandbox.runner import Runner
from megatron_spo.sandbox.server import SandboxServer, ServerConfig


async def bare(python: str) -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(python, "-c", "print(1+1)", stdout=asyncio.subprocess.PIPE,
                                                stdin=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    dt = time.perf_counter() - t0
    assert out == b"2\n", out
    return dt


async def main(rounds: int, warmup: int) -> None:
    cfg = ServerConfig(concurrency=1, uid_base=61400)
    server = SandboxServer(cfg)
    runner = server.runner
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app_runner = web.AppRunner(server.app())
    await app_runner.setup()  # runs the start-up self-test too
    site = web.TCPSite(app_runner, "127.0.0.1", port)
    await site.start()

    no_cg = Runner(dataclasses.replace(runner.config, cgroup=None))

    async def isolated(r: Runner = runner) -> float:
        t0 = time.perf_counter()
        req = api.parse_request({"code": "print(1+1)", "language": "python"}, cfg.limits)
        resp = await r.run(req, 0)
        dt = time.perf_counter() - t0
        assert resp["run_result"]["stdout"] == "2\n", resp
        return dt

    summary = server.isolation_summary()
    times = {"bare python -c": [], "isolated (runner)": [], "isolated, no cgroup": [], "isolated + HTTP": []}
    try:
        async with SandboxClient(f"http://127.0.0.1:{port}", max_attempts=1) as client:

            async def http() -> float:
                t0 = time.perf_counter()
                resp = await client.run_code("print(1+1)")
                dt = time.perf_counter() - t0
                assert resp["run_result"]["stdout"] == "2\n", resp
                return dt

            fns = [lambda: bare(cfg.python), isolated, lambda: isolated(no_cg), http]
            for r in range(warmup + rounds):
                for name, fn in zip(times, fns):
                    dt = await fn()
                    if r >= warmup:
                        times[name].append(dt)
    finally:
        await app_runner.cleanup()

    print(f"isolation: {summary}  python: {cfg.python}  rounds: {rounds}")
    print(f"{'case':<22} {'median ms':>10} {'p90 ms':>8} {'min ms':>8}")
    for name, ts in times.items():
        ts = sorted(ts)
        p90 = ts[min(len(ts) - 1, int(0.9 * len(ts)))]
        print(f"{name:<22} {statistics.median(ts) * 1e3:>10.1f} {p90 * 1e3:>8.1f} {ts[0] * 1e3:>8.1f}")
    bare_m = statistics.median(times["bare python -c"])
    for name in ("isolated, no cgroup", "isolated + HTTP"):
        print(f"{name} / bare: {statistics.median(times[name]) / bare_m:.2f}")
    print(f"ratio: {statistics.median(times['isolated (runner)']) / bare_m:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    asyncio.run(main(a.rounds, a.warmup))
