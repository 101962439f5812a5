"""Serve an :class:`EmbeddedEngine` over HTTP: the SGLang-native subset plus vLLM's completions/RL routes.

``python -m megatron_spo.rollout.embedded.server --model DIR --host 127.0.0.1 --port N`` (port 0
picks a free port; ``megatron-spo serve`` takes the same flags). Once listening it prints one line
``LISTENING http://HOST:PORT`` to stdout, which supervisors (:mod:`megatron_spo.rollout.launchers`)
wait for.

The routes of each protocol are in :mod:`.sglang_routes` and :mod:`.vllm_routes`; both act on one
:class:`~.route_base.ServerState`, so e.g. a vLLM ``/sleep`` also refuses SGLang ``/generate``.
Error statuses: 400 for a request no engine can serve (JSON ``{"error": {"message": ...}}`` naming
the item; the clients raise :class:`RequestError`), 503 while memory is released, 500 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from typing import List, Optional

from megatron_spo.rollout.embedded.route_base import ServerState, error_middleware
from megatron_spo.rollout.embedded.sglang_routes import SGLangRoutes
from megatron_spo.rollout.embedded.vllm_routes import VLLMRoutes


class EngineServer:
    """The aiohttp application around one engine (an :class:`EmbeddedEngine`)."""

    def __init__(self, engine, served_model_name: Optional[str] = None):
        self.state = ServerState(engine, served_model_name or engine.model_dir)

    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=1024 ** 3, middlewares=[error_middleware()])
        SGLangRoutes(self.state).add_to(app.router)
        VLLMRoutes(self.state).add_to(app.router)
        return app


async def serve(engine, host: str = "127.0.0.1", port: int = 0, served_model_name: Optional[str] = None):
    """Start serving; returns ``(runner, url)`` (call ``await runner.cleanup()`` to stop)."""
    from aiohttp import web

    runner = web.AppRunner(EngineServer(engine, served_model_name).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # the real port when port=0
    return runner, f"http://{host}:{bound}"


class ServerThread:
    """Serve an engine from a background thread (tests, single-process demos); a context manager.

    ``with ServerThread(engine) as url: ...`` — the server stops on exit.
    """

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 0):
        self.engine, self.host, self.port = engine, host, port
        self.url: Optional[str] = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-http", daemon=True)
        self._runner = None

    def start(self) -> str:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(serve(self.engine, self.host, self.port), self._loop)
        self._runner, self.url = fut.result(timeout=30)
        return self.url

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's flags (``megatron-spo serve`` and ``python -m`` this module)."""
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (0 = any free port)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--served-model-name", default=None)


def run(args) -> int:
    """Load the engine, serve it until interrupted (printing the LISTENING line), then close it."""
    from megatron_spo.rollout.embedded.engine import EmbeddedEngine

    engine = EmbeddedEngine(args.model, seed=args.seed, max_batch=args.max_batch)

    async def forever():
        runner, url = await serve(engine, args.host, args.port, args.served_model_name)
        print(f"LISTENING {url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(forever())
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
