"""Preflight: launcher variables, parallel layout, devices and /health reachability, with clear lines."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from megatron_spo.cli import main
from megatron_spo.commands.preflight import check_devices, check_health, check_launch_env, check_model_layout
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


def test_expert_grid_is_etp_x_ep_x_pp():
    """The expert layers regroup the world as ETP x EP x PP (CP folds into expert DP), as megatron-core does."""
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    bad = check_launch_env(load_config(overrides=["parallel.expert=2", "parallel.expert_tensor=2"]), env)
    assert bad[-1].line() == ("[FAIL] expert parallel: world size 2 is not divisible by ETP*EP*PP = 4 "
                              "(parallel.expert_tensor=2 x parallel.expert=2 x parallel.pipeline=1)")
    ok = check_launch_env(load_config(overrides=["parallel.expert=2", "parallel.expert_tensor=1"]), env)
    assert ok[-1].line() == "[ok] expert parallel: world 2 = ETP 1 x EP 2 x PP 1 x expert-DP 1"


def test_model_layout_against_config_json(tmp_path):
    from megatron_spo.models.tiny import tiny_config

    tiny_config("qwen3").save_pretrained(tmp_path / "m")
    source = tmp_path / "m" / "config.json"
    bad = check_model_layout(load_config(overrides=[f"model.path={tmp_path / 'm'}", "parallel.pipeline=3"]))
    assert bad.line() == ("[FAIL] model layout: parallel.pipeline=3 does not divide the model's "
                          f"num_hidden_layers=2 ({source})")
    good = check_model_layout(load_config(overrides=[f"model.path={tmp_path / 'm'}", "parallel.tensor=2"]))
    assert good.line() == f"[ok] model layout: {source} fits the parallel layout"
    # Not on this node (preflight may run where only the servers are checked): not checked, not failed.
    absent = check_model_layout(load_config(overrides=[f"model.path={tmp_path / 'absent'}"]))
    assert absent.ok and "not checked: no config.json under model.path=" in absent.detail
    assert check_model_layout(load_config()).detail == "not checked: model.path is not set"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("[1, 2]")
    assert not check_model_layout(load_config(overrides=[f"model.path={tmp_path / 'broken'}"])).ok


def test_cli_fails_on_a_bad_model_layout(tmp_path, capsys):
    from megatron_spo.models.tiny import tiny_config

    tiny_config("qwen3").save_pretrained(tmp_path / "m")
    code = main(["preflight", "--set", f"model.path={tmp_path / 'm'}", "--set", "parallel.tensor=3"])
    assert code == 1
    out = capsys.readouterr().out
    assert "[FAIL] model layout: parallel.tensor=3 does not divide the model's num_attention_heads=4" in out
