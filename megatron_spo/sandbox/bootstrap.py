"""The program a sandbox starts with, and the frame the server sends it.

A sandbox is created *before* its request arrives (namespaces, slot uid, rlimits, cgroup, interpreter start-up:
all the cost of isolation), writes the single byte :data:`READY` to its stdout (the server reads it before
anything else: the sandbox is then fully started) and waits on its stdin. The server delivers one request as a
frame:

    8 bytes big-endian header length | marshal header | the files' bytes | the code's bytes | the request's stdin

header ``{"files": [[relpath, size], ...], "code_bytes": n, "rlimits": [[name, value], ...]}`` (marshal
version 2 of dicts, lists, strings and ints reads the same on every Python 3, so the sandbox interpreter may
differ from the server's). The bootstrap reads exactly the frame with ``os.read`` on fd 0, so the bytes after it
stay in the pipe as the program's own stdin. It writes the files and ``main.py`` into its work dir (the
private tmpfs), lowers the per-request rlimits (address space, CPU seconds; an unprivileged process may always
lower them, never raise them again) and runs ``main.py`` as ``python main.py`` would: ``__name__ ==
"__main__"``, ``__file__`` the absolute path, ``sys.argv == ["main.py"]``, ``sys.path[0]`` the work dir,
tracebacks that show only the program's frames, exit code 1 on an uncaught exception.

Each sandbox serves exactly one request and is then destroyed: nothing of one run can be seen by another.

This file is passed to the sandbox interpreter as ``python -c <source>``: it must import only the standard
library, at call time, and must not use ``from __future__`` (``compile`` below uses ``dont_inherit``
anyway). Deviations from a cold ``python main.py`` (output, exit codes and tracebacks are identical:
``tests/sandbox/test_sandbox_bootstrap.py``): ``marshal``, ``resource`` and ``types`` are already imported when
the program starts, ``sys.orig_argv`` shows ``-c``, and two bootstrap frames sit below the program's own in
``traceback.print_stack()`` / ``inspect.stack()``.
"""

import marshal
import os
import sys

HEADER_LEN_BYTES = 8
READY = b"R"
PER_REQUEST_RLIMITS = ("RLIMIT_AS", "RLIMIT_CPU")


def frame_parts(code: str, files: dict, rlimits: dict) -> list:
    """Server side: the frame for one request as a list of byte strings to write in order (without its stdin,
    which the server writes right after). The files' own bytes objects are parts: they are not copied.

    ``files`` maps a relative path to bytes; ``rlimits`` maps a name of :data:`PER_REQUEST_RLIMITS` to a value.
    """
    code_bytes = code.encode("utf-8")
    header = {
        "files": [[rel, len(data)] for rel, data in files.items()],
        "code_bytes": len(code_bytes),
        "rlimits": [[name, int(value)] for name, value in rlimits.items()],
    }
    head = marshal.dumps(header, 2)
    return [len(head).to_bytes(HEADER_LEN_BYTES, "big"), head, *files.values(), code_bytes]


def _read_exact(fd, n):
    chunks = []
    while n > 0:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("the server closed the sandbox's stdin before the request was complete")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _write_file(workdir, rel, data):
    path = os.path.join(workdir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _run_as_main(path, source, workdir):
    import builtins
    import types

    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    module.__cached__ = None
    sys.modules["__main__"] = module
    sys.argv[:] = [os.path.basename(path)]
    sys.path[0] = workdir
    try:
        code = compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as exc:  # printed as `python main.py` does: no traceback header
        exc.__traceback__ = None  # newer Pythons print the exception's own traceback, not the argument
        sys.excepthook(type(exc), exc, None)
        sys.exit(1)
    try:
        exec(code, module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:  # the program's own frames only: drop this function's frame
        exc.__traceback__ = exc.__traceback__.tb_next
        sys.excepthook(type(exc), exc, exc.__traceback__)
        sys.exit(1)


def main():
    """Sandbox side: wait for the frame, set up the work dir and limits, run the program."""
    import resource

    os.write(1, READY)
    size = int.from_bytes(_read_exact(0, HEADER_LEN_BYTES), "big")  # blocks while the sandbox is idle
    header = marshal.loads(_read_exact(0, size))
    workdir = os.getcwd()
    for rel, n in header["files"]:
        data = _read_exact(0, n)
        try:
            _write_file(workdir, rel, data)
        except OSError as exc:
            sys.stderr.write(f"sandbox: could not write request file {rel!r} ({n} bytes): {exc}\n")
            sys.exit(1)
    source = _read_exact(0, header["code_bytes"])
    path = _write_file(workdir, "main.py", source)
    for name, value in header["rlimits"]:
        if name not in PER_REQUEST_RLIMITS:
            raise ValueError(f"unexpected rlimit {name!r} in the request header")
        resource.setrlimit(getattr(resource, name), (value, value))
    del header, resource
    _run_as_main(path, source, workdir)


if __name__ == "__main__":
    main()
