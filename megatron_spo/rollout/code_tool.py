"""The code-interpreter tool the agent loops call, and the SPO ``<interpreter>`` wrapping.

Agent loops talk to a :class:`CodeTool` (``async run(code) -> str``): the text the model sees,
before truncation and ``<interpreter>`` wrapping. :class:`SandboxFusionTool` is the real one: it
posts the SandboxFusion ``/run_code`` JSON (docs/engine_contracts.md §4) through the sandbox
package's :class:`~megatron_spo.sandbox.client.SandboxClient` and turns the answer into text the
way the SPO recipe does (stdout + stderr when ``run_result.status == "Finished"``, else the literal
``"no stdout here"``). Unit tests use a fake tool.

Formatting (docs/algorithms.md §1.11). The text helpers are the sandbox package's, re-exported here
so there is one implementation:
- ``wrap_last_line_print``: the last non-empty line becomes ``print(<line>)`` unless it starts with ``print``.
- ``truncate_middle``: cut to ``max_chars`` in the middle: first half + "...(truncated)..." + last half.
- ``tool_text``: the SandboxFusion response -> model text rule above.
- :func:`interpreter_block` (here): ``"<interpreter>\\n{text}\\n</interpreter>\\n\\n"``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Protocol, runtime_checkable

from megatron_spo.sandbox.client import (  # noqa: F401  (re-exported: one implementation of the SPO text rules)
    NO_STDOUT, TRUNCATION_MARK, SandboxClient, tool_text, truncate_middle, wrap_last_line_print,
)


@runtime_checkable
class CodeTool(Protocol):
    """Runs one Python snippet and returns the text to show the model (may raise; callers catch)."""

    async def run(self, code: str) -> str:
        ...


def interpreter_block(text: str) -> str:
    """The raw text appended after a ``</code>`` turn (tokenised with ``add_special_tokens=False``)."""
    return f"<interpreter>\n{text}\n</interpreter>\n\n"


class SandboxFusionTool:
    """A :class:`CodeTool` backed by a SandboxFusion-compatible ``/run_code`` server.

    The agent loop has already stripped fences and print-wrapped the code (``wrap_print=True`` wraps
    again here for direct use; wrapping is idempotent). The client retries connection errors and
    502/503/504; what still fails raises (``SandboxRequestError``) and the agent loop turns it into
    "Error when executing tool: ..." text and counts it.

    Args:
        url: server base URL.
        run_timeout: seconds the code may run inside the sandbox (verl: 30).
        memory_limit_mb: memory cap for the snippet (verl: 1024).
        client: an existing :class:`SandboxClient` to share its connection pool.
    """

    def __init__(self, url: str = "http://127.0.0.1:8080", *, run_timeout: float = 30.0,
                 memory_limit_mb: int = 1024, wrap_print: bool = False, client: Optional[SandboxClient] = None,
                 **client_kwargs: Any):
        self.client = client or SandboxClient(url, **client_kwargs)
        self.run_timeout = run_timeout
        self.memory_limit_mb = memory_limit_mb
        self.wrap_print = wrap_print

    async def run(self, code: str) -> str:
        if self.wrap_print:
            code = wrap_last_line_print(code)
        response: Dict[str, Any] = await self.client.run_code(code, run_timeout=self.run_timeout,
                                                              memory_limit_mb=self.memory_limit_mb)
        if not isinstance(response, dict):
            raise RuntimeError(f"sandbox {self.client.url} answered {type(response).__name__}, expected a JSON object")
        return tool_text(response)

    async def aclose(self) -> None:
        await self.client.close()
