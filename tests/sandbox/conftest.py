"""Fixtures: the sandbox server as a subprocess on a free 127.0.0.1 port, shut down cleanly afterwards."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import List

import pytest

UID_BASE = 61100  # away from the default so a developer's running server is never swept by the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_isolation() -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap); .ci/run installs it")
    if os.geteuid() != 0:
        pytest.skip("per-slot uids and cgroups need the server to run as root")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    secret: str
    uid_base: int
    concurrency: int
    log_path: str

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as r:
            return json.loads(r.read())

    def post(self, body: dict, timeout: float = 120) -> dict:
        req = urllib.request.Request(
            f"{self.url}/run_code", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


def start_server(tmp_dir: str, extra: List[str] = (), concurrency: int = 2, uid_base: int = UID_BASE) -> Server:
    port = free_port()
    secret = "sbx-secret-" + secrets.token_hex(8)
    env = dict(os.environ, SANDBOX_TEST_SECRET=secret, OMP_NUM_THREADS="1")
    log_path = os.path.join(tmp_dir, f"server_{port}.log")
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "megatron_spo.sandbox.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--concurrency", str(concurrency), "--uid-base", str(uid_base), *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, secret, uid_base, concurrency, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sandbox server exited with {proc.returncode}:\n{server.log()}")
        try:
            server.health()
            return server
        except OSError:
            time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"sandbox server did not come up in 60 s:\n{server.log()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def warm_sandbox_roots(server: Server, timeout: float = 30) -> set:
    """Pids that ``/health`` reports as the slots' ready warm sandboxes; waits until every slot has one."""
    deadline = time.monotonic() + timeout
    health = server.health()
    while health["warm_pool"] and len(health["warm_sandboxes"]) < server.concurrency:
        assert time.monotonic() < deadline, f"slots without a warm sandbox after {timeout} s: {health}"
        time.sleep(0.05)
        health = server.health()
    return set(health["warm_sandboxes"].values())


def slot_uid_pids(server: Server) -> List[int]:
    """Processes owned by the server's slot uids, other than the warm sandboxes (must be none between requests:
    nothing of a run outlives its response). A warm sandbox is a reported root and its descendants, and must
    be pristine: nothing but bwrap and the bootstrap interpreter waiting on its stdin."""
    import psutil

    roots = warm_sandbox_roots(server)
    uids = set(range(server.uid_base, server.uid_base + server.concurrency))
    out = []
    for p in psutil.process_iter(["uids", "status", "cmdline"]):
        try:
            if p.info["uids"].real not in uids or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if p.pid in roots or any(a.pid in roots for a in p.parents()):
                cmd = p.info["cmdline"]
                assert cmd and (cmd[0].endswith("bwrap") or cmd[1:2] == ["-c"]), f"warm sandbox runs {cmd[:3]}"
                continue
            out.append(p.pid)
        except (psutil.NoSuchProcess, TypeError):
            pass
    return out


@pytest.fixture
def leftover_pids():
    """``leftover_pids(server)``: live processes of the server's slot uids that are not a warm sandbox."""
    return slot_uid_pids


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An isolated server (bwrap, per-slot uids, cgroups when available) with concurrency 2 and 1 MiB output cap."""
    need_isolation()
    srv = start_server(str(tmp_path_factory.mktemp("sandbox")), ["--max-output-bytes", str(1 << 20)])
    yield srv
    stop_server(srv)
    assert srv.proc.returncode == 0, srv.log()
