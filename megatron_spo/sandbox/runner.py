"""Run one validated request in a sandbox and build its SandboxFusion response.

A sandbox serves exactly one request and is destroyed with it. Its life:

1. **spawn** (:meth:`Runner._spawn`): bwrap (all namespaces, private tmpfs work dir) and the bootstrap
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
import functools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from megatron_spo.sandbox import api, bootstrap
from megatron_spo.sandbox.isolation import (
    BwrapSpec,
    CgroupV1,
    RunLimits,
    bwrap_argv,
    kill_group,
    kill_uid,
    make_preexec,
    sandbox_env,
)

log = logging.getLogger(__name__)

_CHUNK = 1 << 16
_DRAIN_GRACE_S = 2.0  # after the kill, how long the pipes may take to reach EOF
_START_TIMEOUT_S = 60.0  # from spawn to the ready byte (about 20 ms on an idle 2-core machine)


@dataclass
class RunnerConfig:
    """How runs are isolated. ``bwrap=None`` means the explicit unsafe mode (no namespaces)."""

    limits: api.Limits = field(default_factory=api.Limits)
    bwrap: Optional[BwrapSpec] = None
    python: str = "/usr/bin/python3"
    uid_base: Optional[int] = 61000  # slot s runs as uid/gid uid_base + s; None = keep the server's uid
    cgroup: Optional[CgroupV1] = None
    warm_pool: bool = False  # spawn each slot's next sandbox right after its run (the server turns it on)


@dataclass
class Sandbox:
    """A started sandbox waiting for its one request: its main process (bwrap, or the interpreter in the
    unsafe mode) with its pipes attached to the event loop. ``workdir`` is the host temp dir of the unsafe mode
    (None with bwrap: the work dir is a private tmpfs that dies with the sandbox)."""

    slot: int
    popen: subprocess.Popen
    workdir: Optional[str] = None
    stdin: Optional[asyncio.StreamWriter] = None  # None only until the pipes are attached
    stdout: Optional[asyncio.StreamReader] = None
    stderr: Optional[asyncio.StreamReader] = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.poll()  # reaps the main process once it has exited


async def _attach_pipes(popen: subprocess.Popen) -> Tuple[asyncio.StreamWriter, asyncio.StreamReader,
                                                         asyncio.StreamReader]:
    """Asyncio streams over a started child's stdin, stdout and stderr."""
    loop = asyncio.get_running_loop()
    readers = []
    for pipe in (popen.stdout, popen.stderr):
        reader = asyncio.StreamReader(limit=_CHUNK)
        await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r), pipe)
        readers.append(reader)
    transport, protocol = await loop.connect_write_pipe(lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
                                                        popen.stdin)
    return asyncio.StreamWriter(transport, protocol, None, loop), readers[0], readers[1]


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> Tuple[bytearray, int]:
    """Read to EOF keeping the first ``cap`` bytes; returns (kept bytes, dropped byte count)."""
    kept = bytearray()
    dropped = 0
    while True:
        chunk = await stream.read(_CHUNK)
        if not chunk:
            return kept, dropped
        room = cap - len(kept)
        if room > 0:
            kept += chunk[:room]
        dropped += max(0, len(chunk) - max(room, 0))


async def _wait_ready(sandbox: Sandbox) -> None:
    """Wait for the bootstrap's ready byte: from then on the sandbox only waits for its request."""
    try:
        first = await asyncio.wait_for(sandbox.stdout.readexactly(len(bootstrap.READY)), _START_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RuntimeError(f"the sandbox did not become ready within {_START_TIMEOUT_S:g} s") from None
    except asyncio.IncompleteReadError:
        first = None
    if first != bootstrap.READY:
        err = await asyncio.wait_for(sandbox.stderr.read(4096), _DRAIN_GRACE_S)
        raise RuntimeError(f"the sandbox did not start (exit code {sandbox.popen.poll()}, stdout began {first!r}): "
                           f"{err.decode('utf-8', 'replace').strip()[-2000:]}")


async def _exited(sandbox: Sandbox) -> None:
    """Return when the main process has exited, whether or not its pipes are still open (a daemonised child
    may hold them). A pidfd becomes readable at exit (before reaping)."""
    if sandbox.popen.returncode is not None:
        return
    try:
        pidfd = os.pidfd_open(sandbox.pid)
    except ProcessLookupError:  # already exited and reaped
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(pidfd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def _exit_status(rc: int) -> Tuple[int, Optional[int]]:
    """Normalise to the shell convention (128 + signal) and return (return_code, signal or None).

    bwrap already reports a signal-killed command as 128 + signal; a plain child shows -signal.
    """
    if rc < 0:
        return 128 - rc, -rc
    if rc > 128 and rc - 128 < signal.NSIG:
        return rc, rc - 128
    return rc, None


def _popen_closing(fds: List[int], argv: List[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` on the spawner thread; closes ``fds`` (the child's cgroup.procs) once it returns."""
    try:
        return subprocess.Popen(argv, **kwargs)
    finally:
        for fd in fds:
            os.close(fd)


def _discard_unclaimed(workdir: Optional[str], started: asyncio.Future) -> None:
    """Done-callback of a spawn whose caller was cancelled: kill the sandbox it started (its pid namespace dies
    with bwrap; the next sweep of the slot reaps what is left) and remove its work dir."""
    if not started.cancelled() and started.exception() is None:
        kill_group(started.result().pid)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


def _bootstrap_source() -> str:
    with open(bootstrap.__file__, encoding="utf-8") as f:
        return f.read()


class Runner:
    """Executes requests; one instance per server. ``run`` must be called with a slot no one else uses."""

    def __init__(self, config: RunnerConfig):
        self.config = config
        self._command = [config.python, "-c", _bootstrap_source()]
        self._warm: Dict[int, asyncio.Future] = {}  # slot -> future of its next Sandbox
        # Popen with a preexec_fn cannot use vfork: it blocks its caller for the fork of the server and until
        # the child has exec'd (7-19 ms measured here). It runs on this thread, not on the event loop, so a
        # refill never delays a response. One long-lived thread: bwrap --die-with-parent watches the thread
        # that forked it.
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
            job = functools.partial(
                _popen_closing,
                cg_fds,
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
                preexec_fn=make_preexec(uid, uid, ceiling, cg_fds),
                process_group=0,  # own group for killpg; not a new session (see _drop_controlling_tty)
            )
            started = asyncio.get_running_loop().run_in_executor(self._spawner, job)
            cg_fds = []  # the job closes them once the child has exec'd
        except BaseException:
            for fd in cg_fds:
                os.close(fd)
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        try:
            popen = await asyncio.shield(started)
        except asyncio.CancelledError:
            # The spawner thread finishes the Popen regardless: kill what it starts, nobody will claim it.
            started.add_done_callback(functools.partial(_discard_unclaimed, workdir))
            raise
        except BaseException:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        sandbox = Sandbox(slot, popen, workdir)
        try:
            sandbox.stdin, sandbox.stdout, sandbox.stderr = await _attach_pipes(popen)
            await _wait_ready(sandbox)
        except BaseException:
            await self._dispose(sandbox)
            raise
        return sandbox

    async def _dispose(self, sandbox: Sandbox) -> int:
        """Kill everything of the sandbox's slot and wait for its main process; returns how many were killed."""
        slot = sandbox.slot
        kill_group(sandbox.pid)
        killed = 0
        if self.config.cgroup is not None:
            killed += self.config.cgroup.kill_all(slot)
        uid = self._slot_uid(slot)
        if uid is not None:
            killed += kill_uid(uid, exclude=(sandbox.pid,))
        if sandbox.returncode is None:  # killed above: its exit is a moment away
            await _exited(sandbox)
            sandbox.popen.wait()
        if sandbox.stdin is not None:
            sandbox.stdin.close()
        if sandbox.workdir is not None:
            shutil.rmtree(sandbox.workdir, ignore_errors=True)
        return killed

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
                await self._dispose(sandbox)
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
            await self._dispose(sandbox)
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
        frame = bootstrap.encode_frame(
            req.code, req.files, {"RLIMIT_AS": limits.memory_mb << 20, "RLIMIT_CPU": limits.cpu_seconds}
        )
        cap = cfg.limits.max_output_bytes
        t0 = time.monotonic()
        stdin_task = asyncio.ensure_future(self._feed_stdin(sandbox.stdin, [frame, (req.stdin or "").encode("utf-8")]))
        out_task = asyncio.ensure_future(_read_capped(sandbox.stdout, cap))
        err_task = asyncio.ensure_future(_read_capped(sandbox.stderr, cap))
        timed_out = False
        try:
            try:
                await asyncio.wait_for(_exited(sandbox), timeout=req.run_timeout)
            except asyncio.TimeoutError:
                timed_out = True
            elapsed = time.monotonic() - t0
        finally:
            # Runs on success, timeout and cancellation (client went away): nothing may outlive the run.
            leftovers = await self._dispose(sandbox)
            self.prewarm([slot])
        try:
            (out, out_dropped), (err, err_dropped) = await asyncio.wait_for(
                asyncio.gather(out_task, err_task), timeout=_DRAIN_GRACE_S
            )
        except asyncio.TimeoutError:  # a pipe kept open by something we could not see; take no output
            out_task.cancel()
            err_task.cancel()
            (out, out_dropped), (err, err_dropped) = (bytearray(), 0), (bytearray(), 0)
            log.error("slot %d: output pipes did not close %.1f s after the kill", slot, _DRAIN_GRACE_S)
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
