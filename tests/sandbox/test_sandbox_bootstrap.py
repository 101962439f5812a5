"""The bootstrap runs a program exactly as a cold ``python main.py`` would (no root or bwrap needed).

Each program runs twice with the same interpreter: cold (``python main.py`` in a dir holding the files) and
through the bootstrap (``python -c <bootstrap>`` in an empty dir, the frame and stdin on its stdin). stdout,
stderr and the exit code must be identical once the two dirs are written as ``<w>``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import resource
import subprocess
import sys

import pytest

from megatron_spo.sandbox import bootstrap
from megatron_spo.sandbox.isolation import sandbox_env

def encode_frame(code, files, rlimits):
    return b"".join(bootstrap.frame_parts(code, files, rlimits))


INTERPRETERS = sorted({sys.executable, *(p for p in ["/usr/bin/python3"] if os.access(p, os.X_OK))})
SOURCE = open(bootstrap.__file__, encoding="utf-8").read()

PROGRAMS = {
    "identity": "import os, sys\nprint(sys.argv, __name__, __file__, sys.path[0] == os.getcwd(), __doc__)",
    "docstring": '"""module doc"""\nprint(__doc__)',
    "main_guard": "def f():\n    return 7\nif __name__ == '__main__':\n    print(f())",
    "traceback": "def inner():\n    return {}['missing']\ndef outer():\n    inner()\nprint('before')\nouter()",
    "syntax_error": "print('never')\nx = (\n",
    "exit_code": "import sys\nprint('out')\nsys.exit(3)",
    "exit_message": "import sys\nsys.exit('bad input')",
    "exit_bare": "raise SystemExit",
    "stdin": "import sys\ndata = sys.stdin.read()\nprint(len(data), data.upper())",
    "input_eof": "try:\n    input()\nexcept EOFError:\n    print('eof')",
    "request_files": "import helper\nprint(helper.VALUE, open('data/x.txt').read())",
    "pickle_main_class": "import pickle\nclass C:\n    x = 1\nprint(type(pickle.loads(pickle.dumps(C()))).__name__)",
    "multiprocessing": ("import multiprocessing as mp\ndef sq(x):\n    return x * x\n"
                        "if __name__ == '__main__':\n    with mp.get_context('fork').Pool(2) as p:\n"
                        "        print(p.map(sq, [1, 2, 3]))"),
    "warning": "import warnings\nwarnings.warn('careful')\nprint('ok')",
    "exception_chain": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    raise ValueError('wrapped') from e",
    "unicode": "print('héllo ✓')",
    "flush_at_exit": "import sys\nsys.stdout.write('no newline')",
}
FILES = {"helper.py": b"VALUE = 42\n", "data/x.txt": b"payload"}
STDIN = {"stdin": "abc\ndef\n"}


def _cold(python, code, files, stdin, workdir):
    for rel, data in {**files, "main.py": code.encode()}.items():
        path = os.path.join(workdir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    p = subprocess.run([python, "main.py"], input=stdin.encode(), capture_output=True, cwd=workdir,
                       env=sandbox_env(), timeout=60)
    return p.returncode, p.stdout.decode().replace(workdir, "<w>"), p.stderr.decode().replace(workdir, "<w>")


def _warm(python, code, files, stdin, workdir, rlimits=None):
    frame = encode_frame(code, files, rlimits or {})
    p = subprocess.run([python, "-c", SOURCE], input=frame + stdin.encode(), capture_output=True, cwd=workdir,
                       env=sandbox_env(), timeout=60)
    assert p.stdout.startswith(bootstrap.READY)  # the server reads this byte before the request's output
    out = p.stdout[len(bootstrap.READY):]
    return p.returncode, out.decode().replace(workdir, "<w>"), p.stderr.decode().replace(workdir, "<w>")


@pytest.mark.parametrize("python", INTERPRETERS)
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_same_as_python_main_py(name, python, tmp_path):
    code = PROGRAMS[name]
    files = FILES if name == "request_files" else {}
    stdin = STDIN.get(name, "")
    (tmp_path / "cold").mkdir()
    (tmp_path / "warm").mkdir()
    cold = _cold(python, code, files, stdin, str(tmp_path / "cold"))
    warm = _warm(python, code, files, stdin, str(tmp_path / "warm"))
    assert warm == cold
    if name == "traceback":  # the comparison is only meaningful if the cold run did what the name says
        assert cold[0] == 1 and cold[1] == "before\n" and 'File "<w>/main.py", line 6' in cold[2]
        assert "KeyError: 'missing'" in cold[2] and "<string>" not in warm[2]


def test_request_rlimits_are_lowered_before_the_program(tmp_path):
    code = "import resource as r\nprint(r.getrlimit(r.RLIMIT_AS), r.getrlimit(r.RLIMIT_CPU))"
    rc, out, err = _warm(sys.executable, code, {}, "", str(tmp_path),
                         rlimits={"RLIMIT_AS": 300 << 20, "RLIMIT_CPU": 7})
    assert (rc, out, err) == (0, f"({300 << 20}, {300 << 20}) (7, 7)\n", "")
    # ...and the program cannot raise them again.
    code = "import resource as r\nr.setrlimit(r.RLIMIT_CPU, (8, 8))"
    rc, _, err = _warm(sys.executable, code, {}, "", str(tmp_path), rlimits={"RLIMIT_CPU": 7})
    assert rc == 1 and "ValueError" in err
    assert resource.getrlimit(resource.RLIMIT_CPU) != (7, 7)  # the test process itself is untouched


def test_only_per_request_rlimits_are_accepted(tmp_path):
    rc, _, err = _warm(sys.executable, "print(1)", {}, "", str(tmp_path), rlimits={"RLIMIT_NPROC": 10 ** 6})
    assert rc == 1 and "unexpected rlimit 'RLIMIT_NPROC'" in err


def test_large_files_and_stdin_pass_through_the_frame(tmp_path):
    files = {f"blob{i}.bin": os.urandom(3 << 20) for i in range(3)}
    stdin = "x" * (2 << 20)
    code = ("import hashlib, sys\nfor i in range(3):\n    print(hashlib.sha256(open(f'blob{i}.bin', 'rb').read())"
            ".hexdigest())\nprint(len(sys.stdin.read()))")
    rc, out, err = _warm(sys.executable, code, files, stdin, str(tmp_path))
    expected = [hashlib.sha256(files[f"blob{i}.bin"]).hexdigest() for i in range(3)] + [str(2 << 20)]
    assert (rc, err) == (0, "") and out.split() == expected


def test_truncated_frame_is_an_error_not_a_hang(tmp_path):
    frame = encode_frame("print(1)", {"a.txt": b"abc"}, {})
    p = subprocess.run([sys.executable, "-c", SOURCE], input=frame[:-5], capture_output=True, cwd=tmp_path,
                       timeout=60)
    assert p.returncode == 1 and b"closed the sandbox's stdin before the request was complete" in p.stderr


def test_a_file_that_does_not_fit_is_reported(tmp_path):
    """RLIMIT_FSIZE (set at spawn) stops a request file that is too big; the message names the file."""
    code = "print('ran')"
    frame = encode_frame(code, {"big.bin": b"0" * (1 << 20)}, {})
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
    p = subprocess.run([sys.executable, "-c", limit + SOURCE], input=frame, capture_output=True, cwd=tmp_path,
                       timeout=60)
    assert p.returncode == 1 and b"ran" not in p.stdout
    assert b"could not write request file 'big.bin'" in p.stderr


def test_files_payload_round_trip_with_base64_request():
    """The frame carries what the API decoded: the same bytes the client base64-encoded."""
    from megatron_spo.sandbox import api

    body = {"code": "pass", "files": {"d/e.bin": base64.b64encode(b"\x00\xffabc").decode()}}
    req = api.parse_request(body, api.Limits())
    frame = encode_frame(req.code, req.files, {})
    assert frame.endswith(b"\x00\xffabc" + b"pass")
