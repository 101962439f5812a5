"""aiohttp app: ``POST /run_code`` (SandboxFusion shapes), ``GET /health``, a concurrency limit and a queue.

Concurrency is a pool of worker slots (``asyncio.Queue`` of slot ids). A request waits for a free slot, runs
under that slot's dedicated uid and cgroup, and gives the slot back. Each slot keeps one sandbox started
ahead of its next request (the warm pool, see :mod:`megatron_spo.sandbox.runner`). At most ``max_queue``
requests may wait; beyond that the server answers 503 (a retryable overload) instead of holding unbounded
memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
from dataclasses import dataclass, field
from typing import Optional, Tuple

from aiohttp import web

from megatron_spo.sandbox import api
from megatron_spo.sandbox.isolation import (
    BwrapSpec,
    CgroupV1,
    become_subreaper,
    bwrap_missing_message,
    find_bwrap,
)
from megatron_spo.sandbox.runner import Runner, RunnerConfig

log = logging.getLogger(__name__)

UNSAFE_WARNING = (
    "WARNING: --unsafe-no-isolation: sandboxed code runs WITHOUT bubblewrap namespaces. It can reach the "
    "network and read every file its uid can read. Use only for trusted code on a throwaway machine."
)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    concurrency: int = 2
    max_queue: int = 4096
    unsafe_no_isolation: bool = False
    python: str = "/usr/bin/python3"
    ro_binds: Tuple[str, ...] = ()
    uid_base: int = 61000
    use_cgroup: bool = True
    warm_pool: bool = True
    limits: api.Limits = field(default_factory=api.Limits)
    max_body_bytes: int = 64 << 20


class StartupError(RuntimeError):
    """The server cannot run safely as configured; the message says why and what to do."""


def _check_uid_range(base: int, count: int) -> None:
    for uid in range(base, base + count):
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            continue
        raise StartupError(
            f"uid {uid} (slot {uid - base}) belongs to user {name!r}; the sandbox needs uids nobody else uses "
            f"(they are swept with SIGKILL after each run). Choose another --uid-base."
        )


def build_runner(cfg: ServerConfig) -> Tuple[Runner, list]:
    """Check the host and build the runner. Returns (runner, notes to log). Raises :class:`StartupError`."""
    notes = []
    if cfg.concurrency < 1:
        raise StartupError(f"--concurrency must be >= 1, got {cfg.concurrency}")
    if not os.access(cfg.python, os.X_OK):
        raise StartupError(f"--python {cfg.python!r} is not an executable file")
    bwrap = find_bwrap()
    spec = None
    if cfg.unsafe_no_isolation:
        notes.append(UNSAFE_WARNING)
    elif bwrap is None:
        raise StartupError(bwrap_missing_message())
    else:
        spec = BwrapSpec(bwrap=bwrap, ro_binds=tuple(cfg.ro_binds),
                         workdir_bytes=cfg.limits.workdir_bytes)
    uid_base: Optional[int] = cfg.uid_base
    if os.geteuid() != 0:
        uid_base = None
        notes.append(
            "not running as root: runs keep the server's uid, so there is no per-slot uid, RLIMIT_NPROC is "
            "shared with the server user, and the post-run uid sweep is off (run as root for full isolation)"
        )
    else:
        _check_uid_range(cfg.uid_base, cfg.concurrency)
    if not become_subreaper():
        notes.append("could not become child subreaper: orphaned sandbox zombies are left to the host init")
    cgroup = None
    if cfg.use_cgroup and os.geteuid() == 0:
        cgroup = CgroupV1(name=f"megatron_spo_sandbox_{os.getpid()}_{cfg.uid_base}")
        cgroup.setup(cfg.concurrency, cfg.limits.max_procs)
        notes += cgroup.notes
        if not cgroup.controllers:
            cgroup = None
    elif cfg.use_cgroup:
        notes.append("cgroup limits need root; relying on rlimits")
    runner = Runner(RunnerConfig(limits=cfg.limits, bwrap=spec, python=cfg.python, uid_base=uid_base,
                                 cgroup=cgroup, warm_pool=cfg.warm_pool))
    return runner, notes


class SandboxServer:
    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.runner, self.notes = build_runner(cfg)
        self.slots: Optional[asyncio.Queue] = None
        self.waiting = 0
        self.running = 0
        self.served = 0

    def isolation_summary(self) -> dict:
        rc = self.runner.config
        return {
            "isolation": "bwrap" if rc.bwrap is not None else "none (UNSAFE)",
            "slot_uids": None if rc.uid_base is None else [rc.uid_base, rc.uid_base + self.cfg.concurrency - 1],
            "cgroup": sorted(rc.cgroup.controllers) if rc.cgroup is not None else [],
        }

    async def _on_startup(self, app: web.Application) -> None:
        self.slots = asyncio.Queue()
        for s in range(self.cfg.concurrency):
            self.slots.put_nowait(s)
        # Self-test: a broken bwrap/userns setup should fail now, not on the first rollout.
        probe = api.parse_request({"code": "print(1+1)", "run_timeout": 30}, self.cfg.limits)
        resp = await self.runner.run(probe, 0)
        out = (resp.get("run_result") or {}).get("stdout")
        if resp["status"] != api.SUCCESS or out != "2\n":
            raise StartupError(f"sandbox self-test print(1+1) failed: {json.dumps(resp)[:2000]}")
        self.runner.prewarm(range(self.cfg.concurrency))

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.runner.close()
        if self.runner.config.cgroup is not None:
            self.runner.config.cgroup.teardown()

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok",
            "concurrency": self.cfg.concurrency,
            "running": self.running,
            "queued": self.waiting,
            "served": self.served,
            **self.isolation_summary(),
            "warm_pool": self.cfg.warm_pool,
            # slot -> pid of its ready sandbox (bwrap, or the interpreter in the unsafe mode): these are the
            # only slot-uid processes that exist between requests.
            "warm_sandboxes": {str(slot): pid for slot, pid in self.runner.warm_pids().items()},
        })

    async def run_code(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return web.json_response(api.error_response(f"request body is not valid JSON: {exc}"), status=400)
        except web.HTTPRequestEntityTooLarge:  # aiohttp's own answer would be plain text, not SandboxFusion JSON
            return web.json_response(api.error_response(
                f"request body is larger than the server's limit of {self.cfg.max_body_bytes} bytes"), status=413)
        try:
            req = api.parse_request(body, self.cfg.limits)
        except api.RequestError as exc:
            return web.json_response(api.error_response(str(exc)), status=400)
        if self.waiting >= self.cfg.max_queue:
            return web.json_response(
                api.error_response(f"sandbox overloaded: {self.waiting} requests already queued"), status=503
            )
        self.waiting += 1
        try:
            slot = await self.slots.get()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            resp = await self.runner.run(req, slot)
        except Exception as exc:  # a bug or a host failure: answer in SandboxFusion shape, keep serving
            log.exception("run on slot %d failed", slot)
            return web.json_response(api.error_response(f"sandbox internal error: {type(exc).__name__}: {exc}"),
                                     status=500)
        finally:
            self.running -= 1
            self.slots.put_nowait(slot)
        self.served += 1
        return web.json_response(resp)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
        app.router.add_post("/run_code", self.run_code)
        app.router.add_get("/health", self.health)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app


def serve(cfg: ServerConfig) -> int:
    """Run until SIGINT/SIGTERM. Returns a process exit code."""
    try:
        server = SandboxServer(cfg)
    except StartupError as exc:
        log.error("%s", exc)
        print(f"megatron-spo sandbox: {exc}", flush=True)
        return 2
    for note in server.notes:
        log.warning("%s", note)
        print(f"megatron-spo sandbox: {note}", flush=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"megatron-spo sandbox: note: listening on {cfg.host}, reachable beyond this machine", flush=True)
    print(f"megatron-spo sandbox: serving on http://{cfg.host}:{cfg.port} ({server.isolation_summary()}, "
          f"concurrency {cfg.concurrency})", flush=True)
    try:
        web.run_app(server.app(), host=cfg.host, port=cfg.port, print=None, handle_signals=True)
    except StartupError as exc:
        print(f"megatron-spo sandbox: {exc}", flush=True)
        return 2
    finally:
        if server.runner.config.cgroup is not None:
            server.runner.config.cgroup.teardown()
    return 0
