"""Request parsing/defaults, code-tool helpers, CLI registration, and refusing to start without bwrap."""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys

import pytest

from megatron_spo.sandbox import api
from megatron_spo.sandbox.cli import register
from megatron_spo.sandbox.client import (
    NO_STDOUT,
    prepare_code,
    strip_fences,
    tool_text,
    truncate_middle,
    wrap_last_line_print,
)
from megatron_spo.sandbox.isolation import BwrapSpec, bwrap_argv

LIM = api.Limits()


# ----------------------------------------------------------------------------- request schema


def test_defaults_when_fields_missing():
    req = api.parse_request({"code": "print(1)"}, LIM)
    assert (req.language, req.run_timeout, req.memory_limit_mb, req.stdin, req.files) == ("python", 10.0, 1024, None, {})
    # SandboxFusion's "-1 = unlimited" becomes the server default, never unlimited.
    assert api.parse_request({"code": "", "memory_limit_MB": -1}, LIM).memory_limit_mb == 1024
    assert api.parse_request({"code": "", "memory_limit_MB": 512, "run_timeout": 30}, LIM).memory_limit_mb == 512


@pytest.mark.parametrize(
    "body, needle",
    [
        ([], "JSON object"),
        ({"code": 5}, "code"),
        ({"code": "", "language": "java"}, "language 'java'"),
        ({"code": "", "run_timeout": "10"}, "run_timeout"),
        ({"code": "", "run_timeout": 0}, "run_timeout"),
        ({"code": "", "run_timeout": 301}, "run_timeout"),
        ({"code": "", "memory_limit_MB": 9000}, "memory_limit_MB"),
        ({"code": "", "memory_limit_MB": 8}, "memory_limit_MB"),
        ({"code": "", "stdin": 3}, "stdin"),
        ({"code": "", "files": {"/etc/x": ""}}, "files['/etc/x']"),
        ({"code": "", "files": {"a/../../x": ""}}, "files['a/../../x']"),
        ({"code": "", "files": {"main.py": ""}}, "files['main.py']"),
        ({"code": "", "files": {"a.txt": "not base64!"}}, "files['a.txt']"),
        ({"code": "", "fetch_files": ["out.txt"]}, "fetch_files"),
    ],
)
def test_bad_request_names_the_field(body, needle):
    with pytest.raises(api.RequestError, match=None) as info:
        api.parse_request(body, LIM)
    assert needle in str(info.value)


def test_files_decoded_and_normalised():
    req = api.parse_request({"code": "", "files": {"./d/x.bin": base64.b64encode(b"\x00\x01").decode()}}, LIM)
    assert req.files == {"d/x.bin": b"\x00\x01"}


def test_response_status_rules():
    ok = api.run_response(api.command_result(api.FINISHED, 0.1, 0, "a", ""))
    assert ok["status"] == "Success"
    assert api.run_response(api.command_result(api.FINISHED, 0.1, 2, "", ""))["status"] == "Failed"
    assert api.run_response(api.command_result(api.TIME_LIMIT, 1.0, None, "", ""))["status"] == "Failed"
    err = api.error_response("boom")
    assert err["status"] == "SandboxError" and err["run_result"] is None and err["message"] == "boom"


# ----------------------------------------------------------------------------- code tool helpers


def test_wrap_last_line_print():
    assert wrap_last_line_print("x = 2\nx * 3") == "x = 2\nprint(x * 3)"
    assert wrap_last_line_print("x = 2\nprint(x)\n\n") == "x = 2\nprint(x)\n\n"
    assert wrap_last_line_print("a = 1\n1 + a\n   \n") == "a = 1\nprint(1 + a)\n   \n"
    assert wrap_last_line_print("") == ""
    # Verbatim rule: an indented last line is wrapped too, indentation included (the reference does the
    # same; the result is an IndentationError the model then sees).
    assert wrap_last_line_print("for i in range(2):\n    i") == "for i in range(2):\nprint(    i)"


def test_strip_fences_and_prepare():
    assert strip_fences("```python\nx = 1\nx\n```") == "x = 1\nx"
    assert strip_fences("\n```py\nprint(1)\n```\n") == "print(1)"
    assert strip_fences("print(2)") == "print(2)"
    assert prepare_code("```python\nimport math\nmath.sqrt(16)\n```") == "import math\nprint(math.sqrt(16))"


def test_tool_text():
    fin = {"run_result": {"status": "Finished", "stdout": "out\n", "stderr": "err\n"}}
    assert tool_text(fin) == "out\nerr\n"
    assert tool_text({"run_result": {"status": "TimeLimitExceeded", "stdout": "partial"}}) == NO_STDOUT
    assert tool_text({"status": "SandboxError", "run_result": None}) == "no stdout here"


def test_truncate_middle_by_hand():
    assert truncate_middle("abc", 256) == "abc"
    text = "A" * 100 + "B" * 200 + "C" * 100  # 400 chars > 256: first 128 + mark + last 128
    out = truncate_middle(text)
    assert out == "A" * 100 + "B" * 28 + "...(truncated)..." + "B" * 28 + "C" * 100
    assert len(out) == 256 + len("...(truncated)...")
    assert truncate_middle("0123456789", 5) == "01...(truncated)...789"  # [:2] and [-3:], as verl slices
    assert truncate_middle("x" * 256) == "x" * 256


# ----------------------------------------------------------------------------- isolation argv and CLI


def test_bwrap_argv_shape():
    argv = bwrap_argv(BwrapSpec(bwrap="/usr/bin/bwrap", workdir_bytes=1 << 20), ["/usr/bin/python3", "-c", "pass"])
    joined = " ".join(argv)
    for flag in ["--unshare-all", "--disable-userns", "--die-with-parent", "--clearenv",
                 "--remount-ro / ", "--size 1048576 --tmpfs /tmp", "--dir /tmp/w", "--chdir /tmp/w"]:
        assert flag in joined, flag
    assert "--share-net" not in argv
    assert argv[-4:] == ["--", "/usr/bin/python3", "-c", "pass"]
    # Nothing of the host's private trees is mapped in.
    for host in ["/root", "/home", "/work", "/var"]:
        assert host not in argv


def test_cli_register_defaults():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sandbox", "serve", "--port", "9000", "--concurrency", "3"])
    assert (args.host, args.port, args.concurrency, args.unsafe_no_isolation) == ("127.0.0.1", 9000, 3, False)
    assert args.default_memory_mb == 1024 and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["sandbox", "serve", "--concurrency", "0"])


def _serve_with_path(path: str, extra=(), timeout=20):
    env = dict(os.environ, PATH=path)
    return subprocess.run([sys.executable, "-m", "megatron_spo.sandbox.cli", "serve", "--port", "1", *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_refuses_to_start_without_bwrap(tmp_path):
    proc = _serve_with_path(str(tmp_path))  # an empty PATH dir: no bwrap
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert "bwrap" in out and "apt-get install bubblewrap" in out and "--unsafe-no-isolation" in out


def test_unsafe_mode_warns_on_start(tmp_path):
    # Port 1 cannot be bound by... anyone but root; use an occupied port so the server stops right after the
    # start-up banner either way.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        env = dict(os.environ, PATH=str(tmp_path))
        proc = subprocess.run([sys.executable, "-m", "megatron_spo.sandbox.cli", "serve", "--port", str(port),
                               "--unsafe-no-isolation", "--uid-base", "61300"],
                              capture_output=True, text=True, env=env, timeout=60)
    out = proc.stdout + proc.stderr
    assert "WARNING: --unsafe-no-isolation" in out
    assert "address already in use" in out  # it got as far as binding


def test_no_controlling_tty_even_when_server_has_one(tmp_path):
    """Run the runner under `script` (a real pty as controlling tty): the sandbox still cannot open /dev/tty."""
    import shutil

    if shutil.which("script") is None or shutil.which("bwrap") is None or os.geteuid() != 0:
        pytest.skip("needs util-linux `script`, bubblewrap and root")
    prog = tmp_path / "tty_probe.py"
    prog.write_text(
        "import asyncio, os\n"
        "from megatron_spo.sandbox import api\n"
        "from megatron_spo.sandbox.isolation import BwrapSpec, find_bwrap\n"
        "from megatron_spo.sandbox.runner import Runner, RunnerConfig\n"
        "os.close(os.open('/dev/tty', os.O_RDWR))  # proves this process has a controlling tty\n"
        "r = Runner(RunnerConfig(bwrap=BwrapSpec(bwrap=find_bwrap()), uid_base=61310))\n"
        "code = \"try:\\n    open('/dev/tty', 'w').write('INJECT')\\n    print('TTY-OPENED')\\n\"\n"
        "code += \"except OSError as e:\\n    print('tty-blocked', e.errno)\\n\"\n"
        "resp = asyncio.run(r.run(api.parse_request({'code': code}, api.Limits()), 0))\n"
        "print('RESULT', resp['run_result']['stdout'].strip())\n"
    )
    proc = subprocess.run(["script", "-qec", f"{sys.executable} {prog}", "/dev/null"],
                          capture_output=True, text=True, timeout=60)
    assert "RESULT tty-blocked 6" in proc.stdout, proc.stdout + proc.stderr  # ENXIO: no controlling tty


def test_unsafe_mode_runner_still_limits_and_sweeps():
    """Without bwrap (explicit unsafe mode) the slot uid, rlimits, timeout and the uid sweep still apply."""
    import asyncio

    import psutil

    from megatron_spo.sandbox.isolation import become_subreaper
    from megatron_spo.sandbox.runner import Runner, RunnerConfig

    if os.geteuid() != 0:
        pytest.skip("the per-slot uid needs root")
    become_subreaper()  # as the server does, so the swept daemon's zombie is reaped here
    uid = 61320
    runner = Runner(RunnerConfig(bwrap=None, uid_base=uid))
    token = f"{os.getpid()}.25"
    code = (
        "import os, subprocess\n"
        f"subprocess.Popen(['sleep', '{token}'], start_new_session=True)\n"  # escapes the process group
        "print(os.getuid(), open('data.txt').read())\n"
    )
    req = api.parse_request({"code": code, "files": {"data.txt": base64.b64encode(b"hi").decode()}}, LIM)
    resp = asyncio.run(runner.run(req, 0))
    assert resp["status"] == "Success", resp
    assert resp["run_result"]["stdout"] == f"{uid} hi\n"
    survivors = [p.pid for p in psutil.process_iter(["cmdline"]) if token in " ".join(p.info["cmdline"] or [])]
    assert survivors == []
    loop = api.parse_request({"code": "while True:\n    pass", "run_timeout": 1}, LIM)
    resp = asyncio.run(runner.run(loop, 0))
    assert resp["run_result"]["status"] == "TimeLimitExceeded"
    mem = api.parse_request({"code": "x = bytearray(3 * 1024**3)", "memory_limit_MB": 512}, LIM)
    assert "MemoryError" in asyncio.run(runner.run(mem, 0))["run_result"]["stderr"]
