"""SandboxFusion request/response schema: parsing, defaults, validation and response builders.

The JSON shapes follow bytedance/SandboxFusion (``sandbox/server/sandbox_api.py``, ``runners/types.py``),
see docs/engine_contracts.md §4:

request  ``{"code", "language", "compile_timeout", "run_timeout", "memory_limit_MB", "stdin", "files",
"fetch_files"}``

response ``{"status": "Success"|"Failed"|"SandboxError", "message", "compile_result", "run_result",
"executor_pod_name", "files"}`` with ``run_result = {"status": "Finished"|"Error"|"TimeLimitExceeded",
"execution_time", "return_code", "stdout", "stderr"}``.

Only ``language == "python"`` is served. Missing fields take the defaults of :class:`Limits`; in particular
the PyPI ``sandbox-fusion`` client never sends ``memory_limit_MB`` (its pydantic model has no such field), so
the server must apply its own memory cap rather than run unlimited.
"""

from __future__ import annotations

import base64
import binascii
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

SUCCESS, FAILED, SANDBOX_ERROR = "Success", "Failed", "SandboxError"
FINISHED, ERROR, TIME_LIMIT = "Finished", "Error", "TimeLimitExceeded"

SUPPORTED_LANGUAGES = ("python",)


class RequestError(ValueError):
    """A request field is missing or invalid; the message names the field and the value."""


@dataclass(frozen=True)
class Limits:
    """Server-side defaults and caps for one request.

    Units: seconds for timeouts, MiB for memory, bytes for the output and work-dir caps.
    """

    default_run_timeout: float = 10.0  # SandboxFusion's default
    max_run_timeout: float = 300.0
    default_memory_mb: int = 1024  # used when the client omits memory_limit_MB or sends <= 0
    max_memory_mb: int = 8192
    max_output_bytes: int = 1 << 20  # per stream; the rest is read and dropped
    max_files: int = 64
    max_file_bytes: int = 16 << 20  # decoded size of one request file; also RLIMIT_FSIZE
    workdir_bytes: int = 64 << 20  # size of the private tmpfs the code runs in
    max_procs: int = 64  # RLIMIT_NPROC of the slot uid and pids.max of the slot cgroup
    max_open_files: int = 256


@dataclass
class RunRequest:
    """A validated ``/run_code`` request. ``files`` maps a relative path to decoded bytes."""

    code: str
    run_timeout: float
    memory_limit_mb: int
    stdin: Optional[str] = None
    files: Dict[str, bytes] = field(default_factory=dict)
    fetch_files: List[str] = field(default_factory=list)
    language: str = "python"


def _number(body: Dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _safe_relpath(path: Any, key: str) -> str:
    """Files land in the sandbox work dir; refuse absolute paths and ``..`` so a name means one place."""
    if not isinstance(path, str) or not path:
        raise RequestError(f"{key}: file name must be a non-empty string, got {path!r}")
    norm = posixpath.normpath(path)
    if path.startswith("/") or norm == "." or norm.startswith("../") or norm == ".." or "\0" in path:
        raise RequestError(f"{key}: file name {path!r} must be a relative path inside the work dir")
    return norm


def parse_request(body: Any, limits: Limits) -> RunRequest:
    """Validate a decoded JSON body and fill in defaults. Raises :class:`RequestError` naming the field."""
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    code = body.get("code")
    if not isinstance(code, str):
        raise RequestError(f"code must be a string, got {code!r:.80}")
    # The code is written to main.py under RLIMIT_FSIZE = max_file_bytes; a UTF-8 character is 1 to 4 bytes,
    # so only code that might not fit is encoded to be measured.
    if len(code) * 4 > limits.max_file_bytes:
        code_bytes = len(code.encode("utf-8", "surrogatepass"))
        if code_bytes > limits.max_file_bytes:
            raise RequestError(f"code is {code_bytes} bytes, at most {limits.max_file_bytes} allowed "
                               "(the sandbox's file-size limit)")
    language = body.get("language", "python")
    if language not in SUPPORTED_LANGUAGES:
        raise RequestError(f"language {language!r} is not supported (supported: {', '.join(SUPPORTED_LANGUAGES)})")

    run_timeout = _number(body, "run_timeout", limits.default_run_timeout)
    if not 0 < run_timeout <= limits.max_run_timeout:
        raise RequestError(f"run_timeout must be in (0, {limits.max_run_timeout}] seconds, got {run_timeout}")

    # SandboxFusion uses -1 for "no limit"; this server never runs unlimited, so <= 0 means the default.
    memory = _number(body, "memory_limit_MB", -1)
    memory_mb = limits.default_memory_mb if memory <= 0 else int(memory)
    if memory_mb > limits.max_memory_mb:
        raise RequestError(f"memory_limit_MB must be <= {limits.max_memory_mb}, got {memory_mb}")
    if memory_mb < 16:
        raise RequestError(f"memory_limit_MB must be >= 16 (the interpreter needs it), got {memory_mb}")

    stdin = body.get("stdin")
    if stdin is not None and not isinstance(stdin, str):
        raise RequestError(f"stdin must be a string or null, got {type(stdin).__name__}")

    raw_files = body.get("files") or {}
    if not isinstance(raw_files, dict):
        raise RequestError(f"files must be an object mapping path to base64, got {type(raw_files).__name__}")
    if len(raw_files) > limits.max_files:
        raise RequestError(f"files has {len(raw_files)} entries, at most {limits.max_files} allowed")
    files: Dict[str, bytes] = {}
    for name, content in raw_files.items():
        rel = _safe_relpath(name, f"files[{name!r}]")
        if rel == "main.py":
            raise RequestError("files['main.py'] would overwrite the submitted code; choose another name")
        if content is None:  # the PyPI client allows null content: an empty file
            data = b""
        elif isinstance(content, str):
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise RequestError(f"files[{name!r}] is not valid base64: {exc}") from None
        else:
            raise RequestError(f"files[{name!r}] must be a base64 string, got {type(content).__name__}")
        if len(data) > limits.max_file_bytes:
            raise RequestError(f"files[{name!r}] is {len(data)} bytes, at most {limits.max_file_bytes} allowed")
        files[rel] = data

    fetch = body.get("fetch_files") or []
    if not isinstance(fetch, list):
        raise RequestError(f"fetch_files must be a list, got {type(fetch).__name__}")
    if fetch:
        raise RequestError(
            f"fetch_files {fetch!r:.80} is not supported: the work dir is a private tmpfs that vanishes with the run"
        )
    return RunRequest(
        code=code, run_timeout=run_timeout, memory_limit_mb=memory_mb, stdin=stdin, files=files, language=language
    )


def command_result(
    status: str, execution_time: float, return_code: Optional[int], stdout: str, stderr: str
) -> Dict[str, Any]:
    """A SandboxFusion ``CommandRunResult``; ``execution_time`` is wall seconds."""
    return {
        "status": status,
        "execution_time": execution_time,
        "return_code": return_code,
        "stdout": stdout,
        "stderr": stderr,
    }


def run_response(run_result: Dict[str, Any], message: str = "") -> Dict[str, Any]:
    """Top-level status as SandboxFusion computes it: Success only for Finished with return code 0."""
    ok = run_result["status"] == FINISHED and run_result["return_code"] == 0
    return {
        "status": SUCCESS if ok else FAILED,
        "message": message,
        "compile_result": None,
        "run_result": run_result,
        "executor_pod_name": None,
        "files": {},
    }


def error_response(message: str) -> Dict[str, Any]:
    """The runner itself failed (bad request, spawn failure, overload): no run_result."""
    return {
        "status": SANDBOX_ERROR,
        "message": message,
        "compile_result": None,
        "run_result": None,
        "executor_pod_name": None,
        "files": {},
    }
