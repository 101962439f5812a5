"""The PyPI ``sandbox-fusion`` client (and verl-style raw JSON) against our server: the four basic outcomes."""

from __future__ import annotations

import base64

import pytest
from sandbox_fusion import CommandRunStatus, RunCodeRequest, RunStatus, run_code


def _run(server, **kw):
    return run_code(RunCodeRequest(language="python", **kw), endpoint=server.url, max_attempts=1, client_timeout=60)


def test_success(server):
    resp = _run(server, code="print(1+1)")
    assert resp.status == RunStatus.Success
    assert resp.run_result.status == CommandRunStatus.Finished
    assert resp.run_result.stdout == "2\n"
    assert resp.run_result.return_code == 0
    assert resp.run_result.stderr == ""
    assert 0 < resp.run_result.execution_time < 10
    assert resp.compile_result is None and resp.files == {}


def test_nonzero_exit(server):
    resp = _run(server, code="import sys\nprint('before')\nsys.exit(3)")
    assert resp.status == RunStatus.Failed
    assert resp.run_result.status == CommandRunStatus.Finished
    assert resp.run_result.return_code == 3
    assert resp.run_result.stdout == "before\n"


def test_exception_traceback_in_stderr(server):
    resp = _run(server, code="1/0")
    assert resp.status == RunStatus.Failed
    assert resp.run_result.return_code == 1
    assert "ZeroDivisionError" in resp.run_result.stderr


def test_timeout(server):
    resp = _run(server, code="print('start', flush=True)\nwhile True:\n    pass", run_timeout=1)
    assert resp.status == RunStatus.Failed
    assert resp.run_result.status == CommandRunStatus.TimeLimitExceeded
    assert resp.run_result.return_code is None
    assert resp.run_result.stdout == "start\n"  # output produced before the kill is kept
    assert 1.0 <= resp.run_result.execution_time < 5
    assert "timeout" in resp.message


def test_memory_error_default_cap(server):
    # The PyPI request model has no memory_limit_MB: the server's default cap (1024 MB) must apply.
    assert "memory_limit_MB" not in RunCodeRequest(code="", language="python").dict()
    resp = _run(server, code="x = bytearray(2 * 1024**3)\nprint('allocated')")
    assert resp.status == RunStatus.Failed
    assert resp.run_result.status == CommandRunStatus.Finished
    assert resp.run_result.return_code == 1
    assert "MemoryError" in resp.run_result.stderr
    assert "allocated" not in resp.run_result.stdout


def test_raw_verl_payload_memory_limit(server):
    """verl posts raw JSON with memory_limit_MB; 300 MB fits under 512 MB, 600 MB does not."""
    base = {"language": "python", "run_timeout": 10, "compile_timeout": 10, "memory_limit_MB": 512,
            "stdin": None, "files": {}, "fetch_files": []}
    ok = server.post({**base, "code": "x = bytearray(300 * 1024**2)\nprint(len(x) >> 20)"})
    assert ok["status"] == "Success" and ok["run_result"]["stdout"] == "300\n"
    bad = server.post({**base, "code": "x = bytearray(600 * 1024**2)\nprint(len(x) >> 20)"})
    assert bad["status"] == "Failed" and "MemoryError" in bad["run_result"]["stderr"]
    assert set(ok) == {"status", "message", "compile_result", "run_result", "executor_pod_name", "files"}
    assert set(ok["run_result"]) == {"status", "execution_time", "return_code", "stdout", "stderr"}


def test_stdin_and_files(server):
    files = {"data/nums.txt": base64.b64encode(b"3 4 5\n").decode(), "empty.txt": None}
    code = ("import os\nn = sum(map(int, open('data/nums.txt').read().split()))\n"
            "print(n, input(), os.path.getsize('empty.txt'))")
    resp = _run(server, code=code, stdin="hello\n", files=files)
    assert resp.status == RunStatus.Success, resp
    assert resp.run_result.stdout == "12 hello 0\n"


def test_bad_requests_name_the_field(server):
    import urllib.error

    for body, field in [
        ({"code": "print(1)", "language": "cpp"}, "language"),
        ({"code": "print(1)", "language": "python", "run_timeout": -1}, "run_timeout"),
        ({"code": "print(1)", "language": "python", "memory_limit_MB": 10**6}, "memory_limit_MB"),
        ({"code": "print(1)", "language": "python", "files": {"../x": ""}}, "files"),
        ({"language": "python"}, "code"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as info:
            server.post(body)
        assert info.value.code == 400
        payload = info.value.read().decode()
        assert '"SandboxError"' in payload and field in payload, (body, payload)
    # And the PyPI client surfaces the message instead of a typed response.
    with pytest.raises(Exception, match="language"):
        run_code(RunCodeRequest(code="x", language="nodejs"), endpoint=server.url, max_attempts=1)
