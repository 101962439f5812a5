"""Preflight: launcher variables, parallel layout, devices and /health reachability, with clear lines."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from megatron_spo.cli import main
from megatron_spo.commands.preflight import check_devices, check_health, check_launch_env
from megatron_spo.config import load_config


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server API)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launch_env_and_layout():
    cfg = load_config(overrides=["parallel.tensor=2"])
    env = {"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    lines = [c.line() for c in check_launch_env(cfg, env)]
    assert lines == ["[ok] launcher: rank 1 of 4, master n1:29500",
                     "[ok] parallel layout: world 4 = TP 2 x PP 1 x CP 1 x DP 2"]
    bad = check_launch_env(cfg, {"WORLD_SIZE": "3"})
    assert [c.ok for c in bad] == [False, False]
    assert "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not" in bad[0].detail
    assert "world size 3 is not divisible by TP*PP*CP = 2" in bad[1].detail


def test_gpu_only_features_fail_on_cpu():
    cfg = load_config(overrides=["parallel.tensor=2", "parallel.sequence_parallel=true"])
    (check,) = check_devices(cfg, cuda_available=False)
    assert not check.ok and "sequence_parallel need CUDA" in check.detail
    assert check_devices(load_config(), cuda_available=False)[0].ok


def test_health_reachable_and_not(health_server):
    assert check_health("srv", health_server).ok
    down = check_health("srv", f"http://127.0.0.1:{_closed_port()}", timeout_s=1.0)
    assert not down.ok and "not reachable within 1s" in down.detail


def test_cli_exit_codes(health_server, capsys):
    assert main(["preflight", "--set", "rollout.engine=sglang", "--set", f"rollout.urls=[{health_server}]"]) == 0
    out = capsys.readouterr().out
    assert "[ok] rollout server 0:" in out and "0 failed" in out
    port = _closed_port()
    code = main(["preflight", "--sandbox", "--timeout", "1", "--set", f"rollout.sandbox_url=http://127.0.0.1:{port}"])
    assert code == 1
    assert f"[FAIL] sandbox: http://127.0.0.1:{port}/health not reachable" in capsys.readouterr().out
