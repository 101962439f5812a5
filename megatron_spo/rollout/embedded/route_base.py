"""What the SGLang and vLLM route sets of the embedded server share.

The served engine and its memory state (released / sleeping: either protocol's call refuses
generation until the matching resume), JSON bodies in and out, prompt validation, running a batch
of requests on the engine, weight updates, and the middleware that turns exceptions into error
answers: 400 for a request no engine can serve (JSON ``{"error": {"message": ...}}`` naming the
item; the clients raise :class:`RequestError`), 503 while memory is released, 500 otherwise.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from megatron_spo.rollout.engine import GenerateResult, RequestError, SamplingParams


@dataclass
class ServerState:
    """The engine one server serves and what its control routes set."""

    engine: Any  # an EmbeddedEngine
    served_model_name: str
    released: bool = False  # SGLang release_memory_occupation
    sleeping: bool = False  # vLLM sleep


def json_response(data: Any, status: int = 200):
    from aiohttp import web

    return web.json_response(data, status=status)


def error_response(status: int, message: str):
    """An error answer both protocols' clients read (``error.message`` and SGLang's ``message``)."""
    return json_response({"error": {"message": message, "code": status}, "success": False, "message": message},
                         status)


def error_middleware():
    """aiohttp middleware: a bad request -> 400, any other failure -> 500 (the server keeps running)."""
    from aiohttp import web

    @web.middleware
    async def middleware(request, handler):
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (RequestError, ValueError, KeyError, TypeError, FileNotFoundError) as err:
            return error_response(400, f"{request.path}: {err}")
        except Exception as err:  # noqa: BLE001 - reported to the client, server keeps running
            return error_response(500, f"{request.path}: {type(err).__name__}: {err}")
    return middleware


async def read_body(request) -> Dict[str, Any]:
    """The request's JSON object (``{}`` without a body); RequestError when it is not one."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as err:
        raise RequestError(f"body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError(f"body must be a JSON object, got {type(body).__name__}")
    return body


def parse_prompts(value: Any, key: str) -> List[List[int]]:
    """One prompt (a list of ids) or a list of prompts -> a list of prompts."""
    if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        return value
    raise RequestError(f"{key} must be a non-empty list of token ids or a list of such lists")


def route(method: str, *paths: str):
    """Mark a handler as serving ``paths`` for HTTP ``method`` ("GET", "POST" or "*" for any)."""
    def mark(handler):
        handler.routes = getattr(handler, "routes", ()) + tuple((method, p) for p in paths)
        return handler
    return mark


class Routes:
    """Base of a protocol's route set over a shared :class:`ServerState`; handlers carry :func:`route`."""

    def __init__(self, state: ServerState):
        self.state = state

    @property
    def engine(self):
        return self.state.engine

    def add_to(self, router) -> None:
        """Register every :func:`route`-marked handler of this class on an aiohttp router, in the
        order they are defined (GET routes also answer HEAD, as ``add_get`` does)."""
        for name, fn in vars(type(self)).items():
            for method, path in getattr(fn, "routes", ()):
                if method == "GET":
                    router.add_get(path, getattr(self, name))
                else:
                    router.add_route(method, path, getattr(self, name))

    def check_awake(self) -> None:
        if self.state.released or self.state.sleeping:
            from aiohttp import web

            raise web.HTTPServiceUnavailable(text="memory released / sleeping: call resume_memory_occupation / wake_up")

    async def run(self, prompts: List[List[int]], sampling: SamplingParams, rids: List[str]) -> List[GenerateResult]:
        """Generate every prompt on the engine's batching worker; results in order."""
        reqs = [self.engine.make_request(p, sampling, rid) for p, rid in zip(prompts, rids)]  # validate all first
        futs = [asyncio.wrap_future(self.engine.submit(r)) for r in reqs]
        try:
            return list(await asyncio.gather(*futs))
        except asyncio.CancelledError:  # client went away: stop decoding its rows
            for r in reqs:
                r.aborted = True
            raise

    async def update(self, source, version: Optional[Any], abort: bool) -> Dict[str, Any]:
        """Load ``source`` (a path or buckets) off the event loop; version None = current + 1."""
        v = self.engine.weight_version + 1 if version is None else int(version)
        n = await asyncio.to_thread(self.engine.update_weights, source, v, abort_in_flight=abort)
        return {"success": True, "message": f"loaded {n} tensors, weight_version {v}", "num_paused_requests": 0,
                "weight_version": str(v)}
