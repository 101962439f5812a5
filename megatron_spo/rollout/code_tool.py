"""The code-interpreter tool the agent loops call, and the SPO tool-text formatting.

Agent loops talk to a :class:`CodeTool` (``async run(code) -> str``): the text the model sees,
before truncation and ``<interpreter>`` wrapping. :class:`SandboxFusionTool` is the real one: it
posts the SandboxFusion ``/run_code`` JSON (spec engine_contracts.md §4) and turns the answer into
text the way the SPO recipe does (stdout + stderr when ``run_result.status == "Finished"``, else
the literal ``"no stdout here"``). Unit tests use a fake tool.

The formatting helpers reproduce spec algorithms.md §1.11:
- :func:`wrap_last_line_print`: the last non-empty line becomes ``print(<line>)`` unless it already
  starts with ``print``.
- :func:`truncate_middle`: cut to ``max_chars`` in the middle: first half + "...(truncated)..." + last half.
- :func:`interpreter_block`: ``"<interpreter>\\n{text}\\n</interpreter>\\n\\n"``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Optional, Protocol, runtime_checkable

TRUNCATION_MARK = "...(truncated)..."
NO_STDOUT = "no stdout here"


@runtime_checkable
class CodeTool(Protocol):
    """Runs one Python snippet and returns the text to show the model (may raise; callers catch)."""

    async def run(self, code: str) -> str:
        ...


def wrap_last_line_print(code: str) -> str:
    """Wrap the last non-empty line as ``print(<line>)`` unless it starts with ``print``.

    As in the SPO recipe the check is on the raw line (no strip), so an indented last line is
    wrapped too; only whitespace-only lines count as empty (the recipe skips exactly-empty lines;
    wrapping a blank line would only produce a syntax error).
    """
    lines = code.split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip() == "":
            continue
        if not lines[i].startswith("print"):
            lines[i] = f"print({lines[i]})"
        break
    return "\n".join(lines)


def truncate_middle(text: str, max_chars: int = 256) -> str:
    """Keep at most ``max_chars`` characters of ``text`` (plus the mark), cut in the middle.

    ``text`` longer than ``max_chars`` becomes ``text[:h] + "...(truncated)..." + text[-h:]`` with
    ``h = max_chars // 2``; shorter text is returned unchanged.
    """
    if max_chars <= 0:
        raise ValueError(f"truncate_middle: max_chars must be > 0, got {max_chars}")
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + TRUNCATION_MARK + text[len(text) - half:]


def interpreter_block(text: str) -> str:
    """The raw text appended after a ``</code>`` turn (tokenised with ``add_special_tokens=False``)."""
    return f"<interpreter>\n{text}\n</interpreter>\n\n"


def sandbox_result_text(response: Dict[str, Any]) -> str:
    """Tool text from a SandboxFusion ``/run_code`` response dict.

    stdout + stderr of ``run_result`` when its status is "Finished", else "no stdout here".
    """
    run = response.get("run_result") or {}
    if run.get("status") == "Finished":
        return (run.get("stdout") or "") + (run.get("stderr") or "")
    return NO_STDOUT


class SandboxFusionTool:
    """A :class:`CodeTool` backed by a SandboxFusion-compatible ``/run_code`` server.

    It posts the JSON body of spec engine_contracts.md §4 with httpx (the shapes verl posts; the
    PyPI ``sandbox-fusion`` client drops ``memory_limit_MB``, so the raw body is sent). The last
    line is print-wrapped first. A non-200 reply or a transport error raises ``RuntimeError``
    (the agent loop turns it into "Error when executing tool: ..." text and counts it).

    Args:
        url: server base URL (``/run_code`` is appended).
        run_timeout: seconds the code may run inside the sandbox.
        request_timeout: seconds for the whole HTTP request (must exceed ``run_timeout``).
        memory_limit_mb: memory cap for the snippet.
        retries_on_504: re-posts on a 504 (gateway timeout), as verl does.
    """

    def __init__(self, url: str = "http://127.0.0.1:8080", *, run_timeout: float = 30.0,
                 compile_timeout: float = 10.0, request_timeout: Optional[float] = None,
                 memory_limit_mb: int = 1024, retries_on_504: int = 2, wrap_print: bool = True):
        self.url = url.rstrip("/") + "/run_code"
        self.run_timeout = run_timeout
        self.compile_timeout = compile_timeout
        self.request_timeout = request_timeout if request_timeout is not None else run_timeout + compile_timeout + 10
        self.memory_limit_mb = memory_limit_mb
        self.retries_on_504 = retries_on_504
        self.wrap_print = wrap_print
        self._client = None

    def payload(self, code: str) -> Dict[str, Any]:
        if self.wrap_print:
            code = wrap_last_line_print(code)
        return {"code": code, "language": "python", "compile_timeout": self.compile_timeout,
                "run_timeout": self.run_timeout, "memory_limit_MB": self.memory_limit_mb,
                "stdin": None, "files": {}, "fetch_files": []}

    async def run(self, code: str) -> str:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.request_timeout)
        body = self.payload(code)
        for attempt in range(self.retries_on_504 + 1):
            try:
                resp = await self._client.post(self.url, json=body)
            except httpx.HTTPError as err:
                raise RuntimeError(f"sandbox {self.url} unreachable: {type(err).__name__}: {err}") from err
            if resp.status_code == 504 and attempt < self.retries_on_504:
                await asyncio.sleep(0.1 * (attempt + 1))
                continue
            if resp.status_code != 200:
                raise RuntimeError(f"sandbox {self.url} answered {resp.status_code}: {resp.text[:200]!r}")
            try:
                data = resp.json()
            except ValueError as err:
                raise RuntimeError(f"sandbox {self.url} answered non-JSON: {resp.text[:200]!r}") from err
            if not isinstance(data, dict):
                raise RuntimeError(f"sandbox {self.url} answered {type(data).__name__}, expected a JSON object")
            return sandbox_result_text(data)
        raise RuntimeError(f"sandbox {self.url}: still 504 after {self.retries_on_504} retries")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
