"""The warm pool: every request gets a sandbox of its own, started ahead of it and destroyed after it.

Needs root and bubblewrap, like the attack tests (the server runs as a subprocess, see conftest).
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import time

import pytest

from conftest import need_isolation, start_server, stop_server, warm_sandbox_roots


def _run(server, code, **kw):
    return server.post({"code": code, "language": "python", "run_timeout": 10, **kw})


def test_every_slot_has_a_warm_sandbox_and_none_is_reused(server, leftover_pids):
    roots = warm_sandbox_roots(server)
    assert len(roots) == server.concurrency
    # Each run leaves a mark in its work dir, /dev/shm and its interpreter; none may see an earlier mark.
    code = ("import os, sys\nseen = [os.path.exists('/tmp/w/mark'), os.path.exists('/dev/shm/mark'),"
            " hasattr(sys, 'mark')]\nopen('/tmp/w/mark', 'w').write('x'); open('/dev/shm/mark', 'w').write('x')\n"
            "sys.mark = 1\nprint(seen)")
    seen_roots = set(roots)
    n = 3 * server.concurrency
    for _ in range(n):
        resp = _run(server, code)
        assert resp["status"] == "Success" and resp["run_result"]["stdout"] == "[False, False, False]\n", resp
        seen_roots |= warm_sandbox_roots(server)  # waits until the used slot has its next sandbox
    # Every request consumed one sandbox and the pool started one in its place: n + concurrency in all.
    assert len(seen_roots) == n + server.concurrency
    assert leftover_pids(server) == []


def test_request_limits_apply_to_the_warm_sandbox(server):
    code = "import resource as r\nprint(r.getrlimit(r.RLIMIT_AS)[0] >> 20, r.getrlimit(r.RLIMIT_CPU)[0])"
    for memory_mb, timeout in [(256, 3), (2048, 20), (300, 1.5)]:
        resp = server.post({"code": code, "memory_limit_MB": memory_mb, "run_timeout": timeout})
        assert resp["run_result"]["stdout"] == f"{memory_mb} {int(-(-timeout // 1)) + 1}\n", resp


def test_warm_sandbox_killed_while_idle_is_replaced(server, leftover_pids):
    for pid in warm_sandbox_roots(server):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    for _ in range(2 * server.concurrency):
        resp = _run(server, "print(1+1)")
        assert resp["status"] == "Success" and resp["run_result"]["stdout"] == "2\n", resp
    assert "exited while idle" in server.log()
    assert leftover_pids(server) == []


def test_files_and_stdin_reach_the_warm_sandbox(server):
    blobs = {f"d{i}/blob.bin": os.urandom(1 << 20) for i in range(3)}
    code = ("import hashlib, sys\nfor i in range(3):\n    print(hashlib.sha256(open(f'd{i}/blob.bin', 'rb').read())"
            ".hexdigest())\nprint(len(sys.stdin.read()))")
    resp = _run(server, code, files={k: base64.b64encode(v).decode() for k, v in blobs.items()}, stdin="y" * 100000)
    expected = [hashlib.sha256(blobs[f"d{i}/blob.bin"]).hexdigest() for i in range(3)] + ["100000"]
    assert resp["run_result"]["stdout"].split() == expected, resp


def test_server_without_warm_pool(tmp_path, leftover_pids):
    need_isolation()
    srv = start_server(str(tmp_path), ["--no-warm-pool"], uid_base=61150)
    try:
        health = srv.health()
        assert health["warm_pool"] is False and health["warm_sandboxes"] == {}
        resp = srv.post({"code": "import sys\nprint(sys.argv, __name__)"})
        assert resp["status"] == "Success" and resp["run_result"]["stdout"] == "['main.py'] __main__\n", resp
        assert leftover_pids(srv) == []  # no sandbox waits between requests
    finally:
        stop_server(srv)
    assert srv.proc.returncode == 0, srv.log()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_shutdown_destroys_the_warm_sandboxes(tmp_path, stop):
    import psutil

    need_isolation()
    srv = start_server(str(tmp_path), uid_base=61160)
    roots = warm_sandbox_roots(srv)
    tree = {p.pid for r in roots for p in [psutil.Process(r), *psutil.Process(r).children(recursive=True)]}
    srv.proc.send_signal(stop)
    srv.proc.wait(timeout=30)
    time.sleep(0.2)
    alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [] and srv.proc.returncode == 0, srv.log()


def _uid_pids(uid: int) -> list:
    import psutil

    return [p.pid for p in psutil.process_iter(["uids", "status"])
            if p.info["uids"] and p.info["uids"].real == uid and p.info["status"] != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("warm_pool", [True, False])
def test_cancelled_request_leaks_no_sandbox(warm_pool):
    """A request cancelled while its sandbox is starting (client gone, server stopping) leaves nothing behind:
    with the warm pool the starting sandbox stays the slot's next one; without it, it is killed."""
    import asyncio

    from megatron_spo.sandbox import api
    from megatron_spo.sandbox.server import ServerConfig, build_runner

    need_isolation()
    cfg = ServerConfig(concurrency=1, uid_base=61170, warm_pool=warm_pool)
    runner, _ = build_runner(cfg)
    uid = cfg.uid_base
    req = api.parse_request({"code": "print(1+1)"}, cfg.limits)

    async def scenario():
        for delay in (0.0, 0.003, 0.01):  # cancelled at different points of the start-up
            runner.prewarm([0])
            task = asyncio.ensure_future(runner.run(req, 0))
            await asyncio.sleep(delay)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.3)  # a discarded sandbox is killed when its Popen returns
            await runner.wait_warm([0])
            alive = _uid_pids(uid)
            if warm_pool:
                assert set(runner.warm_pids()) == {0}
                assert len(alive) <= 3, alive  # only the slot's warm sandbox: bwrap, its init, the bootstrap
            else:
                assert alive == [], alive
            resp = await runner.run(req, 0)
            assert resp["status"] == "Success" and resp["run_result"]["stdout"] == "2\n", resp
        await runner.close()

    try:
        asyncio.run(scenario())
    finally:
        if runner.config.cgroup is not None:
            runner.config.cgroup.teardown()
    time.sleep(0.2)
    assert _uid_pids(uid) == []
