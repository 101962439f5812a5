"""Run one validated request in the sandbox and build its SandboxFusion response.

Flow: the code (``main.py``) and request files go into memfds that bwrap copies into the private tmpfs;
the process starts in its own process group under the slot uid with rlimits; stdout and stderr are read
incrementally, keeping at most ``max_output_bytes`` each and draining (discarding) the rest so a flood
neither blocks the child nor grows server memory; the wall clock is enforced with ``asyncio.wait_for``.
When the main process ends (or times out) the whole tree is killed: process group, cgroup and every
process of the slot uid. A run never returns while one of its processes is alive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from megatron_spo.sandbox import api
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


@dataclass
class RunnerConfig:
    """How runs are isolated. ``bwrap=None`` means the explicit unsafe mode (no namespaces)."""

    limits: api.Limits = field(default_factory=api.Limits)
    bwrap: Optional[BwrapSpec] = None
    python: str = "/usr/bin/python3"
    uid_base: Optional[int] = 61000  # slot s runs as uid/gid uid_base + s; None = keep the server's uid
    cgroup: Optional[CgroupV1] = None


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


async def _exited(proc: asyncio.subprocess.Process) -> None:
    """Return when the main process has exited, whether or not its pipes are still open.

    ``Process.wait()`` also waits for stdout/stderr to close, so a daemonised child holding them would
    turn a finished run into a timeout. A pidfd becomes readable at exit (before reaping).
    """
    if proc.returncode is not None:
        return
    try:
        pidfd = os.pidfd_open(proc.pid)
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


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)  # not CLOEXEC: passed to bwrap through pass_fds anyway
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _exit_status(rc: int) -> Tuple[int, Optional[int]]:
    """Normalise to the shell convention (128 + signal) and return (return_code, signal or None).

    bwrap already reports a signal-killed command as 128 + signal; a plain child shows -signal.
    """
    if rc < 0:
        return 128 - rc, -rc
    if rc > 128 and rc - 128 < signal.NSIG:
        return rc, rc - 128
    return rc, None


class Runner:
    """Executes requests; one instance per server. ``run`` must be called with a slot no one else uses."""

    def __init__(self, config: RunnerConfig):
        self.config = config

    def _slot_uid(self, slot: int) -> Optional[int]:
        if self.config.uid_base is None:
            return None
        return self.config.uid_base + slot

    def _limits(self, req: api.RunRequest) -> RunLimits:
        lim = self.config.limits
        return RunLimits.for_timeout(
            req.run_timeout,
            memory_mb=req.memory_limit_mb,
            max_procs=lim.max_procs,
            max_file_bytes=lim.max_file_bytes,
            max_open_files=lim.max_open_files,
        )

    def _sweep(self, slot: int, pgid: Optional[int]) -> int:
        """Kill everything the run left behind; returns the number of processes killed."""
        killed = 0
        if pgid is not None:
            kill_group(pgid)
        if self.config.cgroup is not None:
            killed += self.config.cgroup.kill_all(slot)
        uid = self._slot_uid(slot)
        if uid is not None:
            killed += kill_uid(uid, exclude=() if pgid is None else (pgid,))
        return killed

    async def run(self, req: api.RunRequest, slot: int) -> Dict[str, Any]:
        cfg = self.config
        limits = self._limits(req)
        uid = self._slot_uid(slot)
        workdir: Optional[str] = None
        fds: List[int] = []
        cg_fds: List[int] = []
        proc = None
        try:
            if cfg.bwrap is not None:
                file_fds = [(_memfd("main.py", req.code.encode("utf-8")), "main.py")]
                file_fds += [(_memfd(os.path.basename(rel), data), rel) for rel, data in req.files.items()]
                fds = [fd for fd, _ in file_fds]
                argv = bwrap_argv(cfg.bwrap, file_fds)
                cwd = None
                env: Dict[str, str] = {}
            else:
                workdir = tempfile.mkdtemp(prefix="megatron_spo_sandbox_")
                for rel, data in [("main.py", req.code.encode("utf-8")), *req.files.items()]:
                    path = os.path.join(workdir, rel)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(data)
                if uid is not None:
                    for d, _, names in os.walk(workdir):
                        for p in [d, *(os.path.join(d, n) for n in names)]:
                            os.chown(p, uid, uid)
                argv = [cfg.python, "main.py"]
                cwd = workdir
                env = sandbox_env()
            if cfg.cgroup is not None:
                # cgroup memory covers the whole tree plus its two tmpfs (/tmp, /dev/shm); RLIMIT_AS one process.
                cg_fds = cfg.cgroup.prepare(slot, (req.memory_limit_mb << 20) + 2 * cfg.limits.workdir_bytes)
            preexec = make_preexec(uid, uid, limits, cg_fds)
            t0 = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if req.stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=cwd,
                preexec_fn=preexec,
                process_group=0,  # own group for killpg; not a new session (see _drop_controlling_tty)
                pass_fds=fds,
            )
        except Exception as exc:  # spawn failure is the sandbox's fault, not the code's
            log.exception("sandbox spawn failed")
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            return api.error_response(f"sandbox could not start the run: {type(exc).__name__}: {exc}")
        finally:
            for fd in fds + cg_fds:
                os.close(fd)

        cap = cfg.limits.max_output_bytes
        out_task = asyncio.ensure_future(_read_capped(proc.stdout, cap))
        err_task = asyncio.ensure_future(_read_capped(proc.stderr, cap))
        stdin_task = asyncio.ensure_future(self._feed_stdin(proc, req.stdin)) if req.stdin else None
        timed_out = False
        try:
            try:
                await asyncio.wait_for(_exited(proc), timeout=req.run_timeout)
            except asyncio.TimeoutError:
                timed_out = True
            elapsed = time.monotonic() - t0
        finally:
            # Runs on success, timeout and cancellation (client went away): nothing may outlive the run.
            leftovers = self._sweep(slot, proc.pid)
            if proc.returncode is None:
                await proc.wait()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
        try:
            (out, out_dropped), (err, err_dropped) = await asyncio.wait_for(
                asyncio.gather(out_task, err_task), timeout=_DRAIN_GRACE_S
            )
        except asyncio.TimeoutError:  # a pipe kept open by something we could not see; take no output
            out_task.cancel()
            err_task.cancel()
            (out, out_dropped), (err, err_dropped) = (bytearray(), 0), (bytearray(), 0)
            log.error("slot %d: output pipes did not close %.1f s after the kill", slot, _DRAIN_GRACE_S)
        if stdin_task is not None:
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
            rc, sig = _exit_status(proc.returncode)
            status = api.FINISHED
            if sig == signal.SIGXCPU:
                status = api.TIME_LIMIT
                notes.insert(0, f"CPU time limit of {limits.cpu_seconds} s exceeded (SIGXCPU)")
            elif sig is not None:
                notes.insert(0, f"killed by signal {signal.Signals(sig).name}")
            result = api.command_result(status, elapsed, rc, stdout, stderr)
        return api.run_response(result, "; ".join(notes))

    @staticmethod
    async def _feed_stdin(proc: asyncio.subprocess.Process, text: str) -> None:
        try:
            proc.stdin.write(text.encode("utf-8"))
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the program exited without reading its input: that is its business
        finally:
            try:
                proc.stdin.close()
            except Exception:
                pass
