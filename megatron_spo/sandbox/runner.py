"""Run one validated request in a sandbox and build its SandboxFusion response.

A sandbox serves exactly one request and is destroyed with it. Its life:

1. **spawn** (:meth:`Runner._spawn`, :mod:`megatron_spo.sandbox.process`): bwrap (all namespaces, private tmpfs work dir) and the bootstrap
   interpreter (:mod:`megatron_spo.sandbox.bootstrap`), in its own process group, under the slot uid, with the
   server's ceiling rlimits, inside the slot's cgroup. It then waits on its stdin. With the **warm pool** (the
   server's default) this happens right after the slot's previous run is swept, so the next request on the
   slot finds its sandbox ready and pays none of the start-up; without it, the request spawns its own.
2. **deliver**: the slot's cgroup memory limit for this request, then the frame (files, code, the request's
   address-space and CPU rlimits, which the bootstrap lowers before the program starts) followed by the
   request's stdin, then EOF.
3. **wait** for the main process to exit or the wall clock (``asyncio.wait_for``), reading stdout and stderr
   incrementally: at most ``max_output_bytes`` each is kept and the rest drained and dropped, so a flood neither
   blocks the child nor grows server memory.
4. **sweep**: process group, cgroup and every process of the slot uid are killed. A run never returns while one
   of its processes is alive, and only then is the slot's next sandbox spawned (it runs under the same uid).

The warm pool moves the cost of isolation off the request's path; it does not remove it. A slot that gets
requests back to back still waits for each sandbox to start (``bench/sandbox_latency.py`` prints both).
A warm-pool runner belongs to one event loop: call :meth:`Runner.close` before that loop ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from megatron_spo.sandbox import api, bootstrap, process
from megatron_spo.sandbox.isolation import BwrapSpec, CgroupV1, RunLimits, bwrap_argv, make_preexec, sandbox_env
from megatron_spo.sandbox.process import DRAIN_GRACE_S, PIPE_LIMIT, Sandbox

log = logging.getLogger(__name__)


@dataclass
class RunnerConfig:
    """How runs are isolated. ``bwrap=None`` means the explicit unsafe mode (no namespaces)."""

    limits: api.Limits = field(default_factory=api.Limits)
    bwrap: Optional[BwrapSpec] = None
    python: str = "/usr/bin/python3"
    uid_base: Optional[int] = 61000  # slot s runs as uid/gid uid_base + s; None = keep the server's uid
    cgroup: Optional[CgroupV1] = None
    warm_pool: bool = False  # spawn each slot's next sandbox right after its run (the server turns it on)


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> Tuple[bytearray, int]:
    """Read to EOF keeping the first ``cap`` bytes; returns (kept bytes, dropped byte count)."""
    kept = bytearray()
    dropped = 0
    while True:
        chunk = await stream.read(PIPE_LIMIT)
        if not chunk:
            return kept, dropped
        room = cap - len(kept)
        if room > 0:
            kept += chunk[:room]
        dropped += max(0, len(chunk) - max(room, 0))


def _exit_status(rc: int) -> Tuple[int, Optional[int]]:
    """Normalise to the shell convention (128 + signal) and return (return_code, signal or None).

    bwrap already reports a signal-killed command as 128 + signal; a plain child shows -signal.
    """
    if rc < 0:
        return 128 - rc, -rc
    if rc > 128 and rc - 128 < signal.NSIG:
        return rc, rc - 128
    return rc, None


def _bootstrap_source() -> str:
    with open(bootstrap.__file__, encoding="utf-8") as f:
        return f.read()


class Runner:
    """Executes requests; one instance per server. ``run`` must be called with a slot no one else uses."""

    def __init__(self, config: RunnerConfig):
        self.config = config
        self._command = [config.python, "-c", _bootstrap_source()]
        self._warm: Dict[int, asyncio.Future] = {}  # slot -> future of its next Sandbox
        # Sandboxes are started on this one long-lived thread, never on the event loop (see process.start).
        self._spawner: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def _slot_uid(self, slot: int) -> Optional[int]:
        if self.config.uid_base is None:
            return None
        return self.config.uid_base + slot

    def _limits(self, run_timeout: float, memory_mb: int) -> RunLimits:
        lim = self.config.limits
        return RunLimits.for_timeout(
            run_timeout,
            memory_mb=memory_mb,
            max_procs=lim.max_procs,
            max_file_bytes=lim.max_file_bytes,
            max_open_files=lim.max_open_files,
        )

    def _cgroup_bytes(self, memory_mb: int) -> int:
        # cgroup memory covers the whole tree plus its two tmpfs (/tmp, /dev/shm); RLIMIT_AS one process.
        return (memory_mb << 20) + 2 * self.config.limits.workdir_bytes

    # ------------------------------------------------------------------ sandbox life cycle

    async def _spawn(self, slot: int) -> Sandbox:
        """Start a sandbox for ``slot`` with the server's ceiling limits; it waits for its request on stdin."""
        cfg = self.config
        uid = self._slot_uid(slot)
        ceiling = self._limits(cfg.limits.max_run_timeout, cfg.limits.max_memory_mb)
        workdir: Optional[str] = None
        cg_fds: List[int] = []
        try:
            if cfg.bwrap is not None:
                argv, cwd, env = bwrap_argv(cfg.bwrap, self._command), None, {}
            else:
                workdir = tempfile.mkdtemp(prefix="megatron_spo_sandbox_")
                if uid is not None:
                    os.chown(workdir, uid, uid)
                argv, cwd, env = self._command, workdir, sandbox_env()
            if cfg.cgroup is not None:
                cfg.cgroup.set_memory_limit(slot, self._cgroup_bytes(cfg.limits.max_memory_mb))
                cg_fds = cfg.cgroup.procs_fds(slot)
            if self._spawner is None:
                self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sandbox-spawn")
            preexec = make_preexec(uid, uid, ceiling, cg_fds)
        except BaseException:
            for fd in cg_fds:
                os.close(fd)
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        return await process.start(slot, argv, uid=uid, cwd=cwd, env=env, preexec=preexec, cgroup_fds=cg_fds,
                                   cgroup=cfg.cgroup, workdir=workdir, executor=self._spawner)

    async def _acquire(self, slot: int) -> Sandbox:
        """The slot's warm sandbox if it is alive, else a new one."""
        pending = self._warm.pop(slot, None)
        if pending is not None:
            try:
                sandbox = await asyncio.shield(pending)
            except asyncio.CancelledError:
                self._warm.setdefault(slot, pending)  # the request went away; the sandbox stays the slot's next
                raise
            except Exception:
                log.warning("slot %d: the warm sandbox could not be started; trying again now", slot, exc_info=True)
            else:
                if sandbox.returncode is None:
                    return sandbox
                log.warning("slot %d: the warm sandbox exited while idle (code %s); starting another",
                            slot, sandbox.returncode)
                await process.destroy(sandbox)
        return await self._spawn(slot)

    def prewarm(self, slots) -> None:
        """Start the warm sandbox of each slot that has none (no-op without the warm pool)."""
        if self.config.warm_pool:
            for slot in slots:
                if slot not in self._warm:
                    self._warm[slot] = asyncio.ensure_future(self._spawn(slot))

    async def wait_warm(self, slots) -> None:
        """Return when the warm sandbox of each of ``slots`` has finished starting (or failed to)."""
        pending = [self._warm[s] for s in slots if s in self._warm]
        if pending:
            await asyncio.wait(pending)

    def warm_pids(self) -> Dict[int, int]:
        """slot -> pid of its ready warm sandbox (the bwrap or interpreter process the server started)."""
        out = {}
        for slot, fut in self._warm.items():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                out[slot] = fut.result().pid
        return out

    async def close(self) -> None:
        """Destroy the warm sandboxes (server shutdown)."""
        pending, self._warm = self._warm, {}
        for fut in pending.values():
            try:
                sandbox = await fut
            except Exception:
                continue
            await process.destroy(sandbox)
        if self._spawner is not None:
            self._spawner.shutdown(wait=False)
            self._spawner = None

    # ------------------------------------------------------------------ one request

    async def run(self, req: api.RunRequest, slot: int) -> Dict[str, Any]:
        cfg = self.config
        limits = self._limits(req.run_timeout, req.memory_limit_mb)
        try:
            sandbox = await self._acquire(slot)
        except Exception as exc:  # spawn failure is the sandbox's fault, not the code's
            log.exception("sandbox spawn failed")
            return api.error_response(f"sandbox could not start the run: {type(exc).__name__}: {exc}")
        if cfg.cgroup is not None:
            cfg.cgroup.set_memory_limit(slot, self._cgroup_bytes(req.memory_limit_mb))
        frame = bootstrap.frame_parts(
            req.code, req.files, {"RLIMIT_AS": limits.memory_mb << 20, "RLIMIT_CPU": limits.cpu_seconds}
        )
        cap = cfg.limits.max_output_bytes
        t0 = time.monotonic()
        stdin = (req.stdin or "").encode("utf-8")
        stdin_task = asyncio.ensure_future(self._feed_stdin(sandbox.stdin, [*frame, stdin]))
        out_task = asyncio.ensure_future(_read_capped(sandbox.stdout, cap))
        err_task = asyncio.ensure_future(_read_capped(sandbox.stderr, cap))
        timed_out = False
        try:
            try:
                await asyncio.wait_for(process.exited(sandbox), timeout=req.run_timeout)
            except asyncio.TimeoutError:
                timed_out = True
            elapsed = time.monotonic() - t0
        finally:
            # Runs on success, timeout and cancellation (client went away): nothing may outlive the run.
            leftovers = await process.destroy(sandbox)
            self.prewarm([slot])
        try:
            (out, out_dropped), (err, err_dropped) = await asyncio.wait_for(
                asyncio.gather(out_task, err_task), timeout=DRAIN_GRACE_S
            )
        except asyncio.TimeoutError:  # a pipe kept open by something we could not see; take no output
            out_task.cancel()
            err_task.cancel()
            (out, out_dropped), (err, err_dropped) = (bytearray(), 0), (bytearray(), 0)
            log.error("slot %d: output pipes did not close %.1f s after the kill", slot, DRAIN_GRACE_S)
        stdin_task.cancel()

        notes = []
        if out_dropped:
            notes.append(f"stdout truncated to {cap} bytes ({out_dropped} bytes dropped)")
        if err_dropped:
            notes.append(f"stderr truncated to {cap} bytes ({err_dropped} bytes dropped)")
        if leftovers:
            # With bwrap this includes its own pid 1 still tearing down the namespace, so it is no signal
            # of misbehaviour by itself; kept in the log for debugging, not in the response.
            log.debug("slot %d: swept %d process(es) after the run", slot, leftovers)
        stdout = out.decode("utf-8", errors="replace")
        stderr = err.decode("utf-8", errors="replace")
        if timed_out:
            notes.insert(0, f"wall-clock timeout after {req.run_timeout:g} s; process tree killed")
            result = api.command_result(api.TIME_LIMIT, elapsed, None, stdout, stderr)
        else:
            rc, sig = _exit_status(sandbox.returncode)
            status = api.FINISHED
            if sig == signal.SIGXCPU:
                status = api.TIME_LIMIT
                notes.insert(0, f"CPU time limit of {limits.cpu_seconds} s exceeded (SIGXCPU)")
            elif sig is not None:
                notes.insert(0, f"killed by signal {signal.Signals(sig).name}")
            result = api.command_result(status, elapsed, rc, stdout, stderr)
        return api.run_response(result, "; ".join(notes))

    @staticmethod
    async def _feed_stdin(stdin: asyncio.StreamWriter, parts: List[bytes]) -> None:
        """Write the frame and the request's stdin, then EOF."""
        try:
            for part in parts:
                stdin.write(part)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the program exited without reading its input: that is its business
        finally:
            stdin.close()
