"""Async SandboxFusion client used by the agent loop, and the SPO/ReTool code-tool helpers.

The client posts the same raw JSON verl posts (docs/algorithms.md §1.11; the request shape is in
docs/engine_contracts.md §4), so it works unchanged against a real SandboxFusion server or ours. It
retries connection errors and retryable HTTP statuses (502/503/504: overload or a proxy timeout) with
exponential backoff; a 4xx is a bad request and is raised at once with the server's message.

Tool helpers (docs/algorithms.md §1.11):

* :func:`prepare_code`: strip markdown fences, then wrap the last non-empty line as ``print(<line>)`` if it
  does not already start with ``print`` (done verbatim, as the reference does, even for indented lines).
* :func:`tool_text`: ``stdout + stderr`` if ``run_result.status == "Finished"``, else ``"no stdout here"``.
* :func:`truncate_middle`: keep the first and last halves of ``max_chars`` around ``"...(truncated)..."``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

import aiohttp

log = logging.getLogger(__name__)

NO_STDOUT = "no stdout here"
TRUNCATION_MARK = "...(truncated)..."
RETRYABLE_STATUS = (502, 503, 504)


class SandboxRequestError(RuntimeError):
    """The server rejected the request (HTTP 4xx) or kept failing after all retries."""


@dataclass
class SandboxClient:
    """Async client for ``POST {url}/run_code``. Use as ``async with SandboxClient(url) as c: ...``.

    ``request_timeout`` (seconds) bounds one HTTP attempt and must exceed the run timeout plus queueing;
    ``max_attempts`` counts the first try.
    """

    url: str = "http://127.0.0.1:8080"
    request_timeout: float = 120.0
    max_attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_connections: int = 128  # verl's tool concurrency

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self._session: Optional[aiohttp.ClientSession] = None

    async def __aenter__(self) -> "SandboxClient":
        self._ensure_session()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=self.request_timeout),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run_code(
        self,
        code: str,
        *,
        run_timeout: float = 30,
        memory_limit_mb: int = 1024,
        stdin: Optional[str] = None,
        files: Optional[Dict[str, str]] = None,
        compile_timeout: float = 10,
    ) -> Dict[str, Any]:
        """Run Python ``code``; returns the SandboxFusion response dict (``status``, ``run_result``, ...).

        ``files`` maps a relative path to base64 content, as in SandboxFusion.
        """
        payload = {
            "code": code,
            "language": "python",
            "run_timeout": run_timeout,
            "compile_timeout": compile_timeout,
            "memory_limit_MB": memory_limit_mb,
            "stdin": stdin,
            "files": files or {},
            "fetch_files": [],
        }
        return await self.post_json("/run_code", payload)

    async def health(self) -> Dict[str, Any]:
        session = self._ensure_session()
        async with session.get(f"{self.url}/health") as resp:
            resp.raise_for_status()
            return await resp.json()

    async def post_json(self, path: str, payload: Dict[str, Any]) -> Dict[str, Any]:
        session = self._ensure_session()
        last: Optional[BaseException] = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                async with session.post(f"{self.url}{path}", json=payload) as resp:
                    if resp.status == 200:
                        return await resp.json(content_type=None)
                    text = await resp.text()
                    if resp.status not in RETRYABLE_STATUS:
                        raise SandboxRequestError(f"POST {path} answered HTTP {resp.status}: {text[:500]}")
                    last = SandboxRequestError(f"HTTP {resp.status}: {text[:200]}")
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as exc:
                last = exc
            if attempt < self.max_attempts:
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random())
                log.warning("sandbox %s attempt %d/%d failed (%s); retrying in %.2f s",
                            path, attempt, self.max_attempts, last, delay)
                await asyncio.sleep(delay)
        raise SandboxRequestError(f"POST {self.url}{path} failed after {self.max_attempts} attempts: {last!r}")


# ----------------------------------------------------------------------------- code tool helpers

_FENCE = re.compile(r"^\s*```[^\n]*\n(.*?)\n?\s*```\s*$", re.S)


def strip_fences(code: str) -> str:
    """Remove one surrounding markdown fence (```python ... ```) if present."""
    m = _FENCE.match(code)
    return m.group(1) if m else code


def wrap_last_line_print(code: str) -> str:
    """If the last non-empty line does not start with ``print``, replace it by ``print(<line>)``."""
    lines = code.split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip() == "":
            continue
        if not lines[i].startswith("print"):
            lines[i] = f"print({lines[i]})"
        break
    return "\n".join(lines)


def prepare_code(code: str) -> str:
    return wrap_last_line_print(strip_fences(code))


def tool_text(response: Dict[str, Any]) -> str:
    """The text the model sees: stdout + stderr when the run Finished (any exit code), else "no stdout here"."""
    rr = response.get("run_result") or {}
    if rr.get("status") == "Finished":
        return (rr.get("stdout") or "") + (rr.get("stderr") or "")
    return NO_STDOUT


def truncate_middle(text: str, max_chars: int = 256) -> str:
    """First ``max_chars // 2`` chars + "...(truncated)..." + last ``max_chars // 2`` chars when too long."""
    if len(text) <= max_chars:
        return text
    # Same slicing as verl's ToolAgentLoop: [:n // 2] and [-n // 2:] (so an odd n keeps one more at the end).
    return text[: max_chars // 2] + TRUNCATION_MARK + text[-max_chars // 2 :]


async def run_code_tool(
    client: SandboxClient, code: str, *, max_chars: int = 256, run_timeout: float = 30, memory_limit_mb: int = 1024
) -> str:
    """One tool call as the SPO agent does it: prepare, run, take the text, truncate in the middle.

    A client-side failure (server unreachable after retries) becomes an error string for the model, as the
    reference turns a Python exception into text rather than aborting the rollout.
    """
    try:
        resp = await client.run_code(prepare_code(code), run_timeout=run_timeout, memory_limit_mb=memory_limit_mb)
        text = tool_text(resp)
    except SandboxRequestError as exc:
        text = f"Error: {exc}"
    return truncate_middle(text, max_chars)
