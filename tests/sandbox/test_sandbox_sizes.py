"""Oversize requests get SandboxFusion-shaped errors: code over the file-size limit 400, a body over the
server's limit 413, both as ``{"status": "SandboxError", "message": ..., "run_result": null, ...}``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from megatron_spo.sandbox import api

SMALL = api.Limits(max_file_bytes=100)
ERROR_KEYS = {"status", "message", "compile_result", "run_result", "executor_pod_name", "files"}


def test_code_over_the_file_size_limit_is_a_request_error():
    assert api.parse_request({"code": "x" * 100}, SMALL).code == "x" * 100  # exactly the limit fits
    with pytest.raises(api.RequestError, match=r"code is 101 bytes, at most 100 allowed"):
        api.parse_request({"code": "x" * 101}, SMALL)
    # the limit is on the UTF-8 bytes written to main.py, not on characters
    assert api.parse_request({"code": "é" * 50}, SMALL)
    with pytest.raises(api.RequestError, match=r"code is 102 bytes"):
        api.parse_request({"code": "é" * 51}, SMALL)


def _post_raw(url: str, data: bytes, timeout: float = 120):
    req = urllib.request.Request(f"{url}/run_code", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def _sandbox_error(status: int, content_type: str, payload: bytes) -> dict:
    assert content_type.startswith("application/json"), (status, content_type, payload[:300])
    body = json.loads(payload)
    assert set(body) == ERROR_KEYS and body["status"] == "SandboxError" and body["run_result"] is None, body
    return body


def test_code_over_the_file_size_limit_gets_400(server):
    limit = api.Limits().max_file_bytes
    code = "#" * limit + "\nprint(1)"
    status, ctype, payload = _post_raw(server.url, json.dumps({"code": code}).encode())
    assert status == 400, payload[:2000]
    body = _sandbox_error(status, ctype, payload)
    assert f"code is {limit + 9} bytes, at most {limit} allowed" in body["message"]
    assert server.post({"code": "print(2)"})["run_result"]["stdout"] == "2\n"  # still serving


def test_body_over_the_server_limit_gets_413_in_the_same_shape(server):
    from megatron_spo.sandbox.server import ServerConfig

    limit = ServerConfig().max_body_bytes
    files = {"big.bin": "A" * (limit + 1024)}  # the JSON body is over the limit before it is decoded
    status, ctype, payload = _post_raw(server.url, json.dumps({"code": "print(1)", "files": files}).encode())
    assert status == 413, payload[:2000]
    body = _sandbox_error(status, ctype, payload)
    assert body["message"] == f"request body is larger than the server's limit of {limit} bytes"
    assert server.post({"code": "print(3)"})["run_result"]["stdout"] == "3\n"
