"""The life of one sandbox process: start it on the spawner thread, attach its pipes to the event loop, wait
for the bootstrap's ready byte, notice its exit, and destroy everything of its slot.

What to start (bwrap or the unsafe mode, uid, limits, cgroup) is the runner's choice
(:mod:`megatron_spo.sandbox.runner`); this module owns the process it is given.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from megatron_spo.sandbox import bootstrap
from megatron_spo.sandbox.isolation import CgroupV1, kill_group, kill_uid

PIPE_LIMIT = 1 << 16  # StreamReader buffer: reading pauses above twice this, so a flood cannot grow memory
DRAIN_GRACE_S = 2.0  # after the kill, how long the pipes may take to reach EOF
START_TIMEOUT_S = 60.0  # from spawn to the ready byte (about 20 ms on an idle 2-core machine)


@dataclass
class Sandbox:
    """A started sandbox: its main process (bwrap, or the interpreter in the unsafe mode) with its pipes
    attached to the event loop. ``uid`` is the slot uid swept at the end (None: the server's own uid, no
    sweep); ``workdir`` is the host temp dir of the unsafe mode (None with bwrap: a private tmpfs)."""

    slot: int
    popen: subprocess.Popen
    uid: Optional[int] = None
    cgroup: Optional[CgroupV1] = None
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


async def start(slot: int, argv: Sequence[str], *, uid: Optional[int], cwd: Optional[str], env: dict,
                preexec: Callable[[], None], cgroup_fds: List[int], cgroup: Optional[CgroupV1],
                workdir: Optional[str], executor: concurrent.futures.Executor) -> Sandbox:
    """Start a sandbox and return it once its bootstrap is ready (blocked on stdin).

    Takes ownership of ``cgroup_fds`` (closed once the child has exec'd) and ``workdir`` (removed with the
    sandbox). ``Popen`` with a ``preexec_fn`` cannot use vfork: it blocks its caller for the fork of the
    server and until the child has exec'd (7-19 ms measured here), so it runs on ``executor``, a single
    long-lived thread (bwrap ``--die-with-parent`` watches the thread that forked it), never on the loop.
    """
    job = functools.partial(_popen_closing, cgroup_fds, list(argv), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, preexec_fn=preexec,
                            process_group=0)  # own group for killpg; not a new session (see isolation.py)
    try:
        started = asyncio.get_running_loop().run_in_executor(executor, job)
    except BaseException:
        for fd in cgroup_fds:
            os.close(fd)
        _remove(workdir)
        raise
    try:
        popen = await asyncio.shield(started)
    except asyncio.CancelledError:
        # The spawner thread finishes the Popen regardless: kill what it starts, nobody will claim it.
        started.add_done_callback(functools.partial(_discard_unclaimed, workdir))
        raise
    except BaseException:
        _remove(workdir)
        raise
    sandbox = Sandbox(slot, popen, uid=uid, cgroup=cgroup, workdir=workdir)
    try:
        sandbox.stdin, sandbox.stdout, sandbox.stderr = await _attach_pipes(popen)
        await _wait_ready(sandbox)
    except BaseException:
        await destroy(sandbox)
        raise
    return sandbox


async def exited(sandbox: Sandbox) -> None:
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


async def destroy(sandbox: Sandbox) -> int:
    """Kill everything of the sandbox's slot (process group, cgroup, every process of the slot uid), reap
    the main process, close stdin, remove the work dir. Returns how many processes were killed."""
    kill_group(sandbox.pid)
    killed = 0
    if sandbox.cgroup is not None:
        killed += sandbox.cgroup.kill_all(sandbox.slot)
    if sandbox.uid is not None:
        killed += kill_uid(sandbox.uid, exclude=(sandbox.pid,))
    if sandbox.returncode is None:  # killed above: its exit is a moment away
        await exited(sandbox)
        sandbox.popen.wait()
    if sandbox.stdin is not None:
        sandbox.stdin.close()
    _remove(sandbox.workdir)
    return killed


async def _attach_pipes(popen: subprocess.Popen) -> Tuple[asyncio.StreamWriter, asyncio.StreamReader,
                                                         asyncio.StreamReader]:
    """Asyncio streams over a started child's stdin, stdout and stderr."""
    loop = asyncio.get_running_loop()
    readers = []
    for pipe in (popen.stdout, popen.stderr):
        reader = asyncio.StreamReader(limit=PIPE_LIMIT)
        await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r), pipe)
        readers.append(reader)
    transport, protocol = await loop.connect_write_pipe(lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
                                                        popen.stdin)
    return asyncio.StreamWriter(transport, protocol, None, loop), readers[0], readers[1]


async def _wait_ready(sandbox: Sandbox) -> None:
    """Wait for the bootstrap's ready byte: from then on the sandbox only waits for its request."""
    try:
        first = await asyncio.wait_for(sandbox.stdout.readexactly(len(bootstrap.READY)), START_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RuntimeError(f"the sandbox did not become ready within {START_TIMEOUT_S:g} s") from None
    except asyncio.IncompleteReadError:
        first = None
    if first != bootstrap.READY:
        err = await asyncio.wait_for(sandbox.stderr.read(4096), DRAIN_GRACE_S)
        raise RuntimeError(f"the sandbox did not start (exit code {sandbox.popen.poll()}, stdout began {first!r}): "
                           f"{err.decode('utf-8', 'replace').strip()[-2000:]}")


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
    _remove(workdir)


def _remove(workdir: Optional[str]) -> None:
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
