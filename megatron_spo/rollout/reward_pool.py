"""A pool of reward worker processes with a hard per-call timeout: a reward that never returns is killed.

A reward computed in a thread of the trainer cannot be stopped: a grader stuck in C code (sympy on
``9^{9^{9^{9^{9}}}}``) holds the interpreter lock, so no timeout fires and SIGTERM is never handled.
:class:`RewardPool` runs the function in separate processes instead
(:mod:`megatron_spo.rollout.reward_worker`): a call that takes longer than ``timeout_s`` is answered
with a timeout, its worker is killed (SIGKILL) and a fresh one is started for a later call.

Workers are persistent, so a call costs one pickled round trip over a socket pair (about 0.1 ms),
not a process start. The first starts with :meth:`RewardPool.prestart` or the first call; more (up to
``workers``) only when a call has waited ``GROW_AFTER_S`` for a busy one; a killed worker is replaced
at once, and its replacement imports the reward while nobody waits. They are started from one
long-lived thread, which is what ``PR_SET_PDEATHSIG`` in the child watches: a worker dies with the
trainer even when the trainer is killed. :meth:`RewardPool.call` is thread-safe and blocks its caller
(the scheduler's reward threads), never the event loop.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, List, Optional

DEFAULT_TIMEOUT_S = 10.0  # well below the 30 s a preempted trainer has to checkpoint and exit
BOOT_TIMEOUT_S = 60.0  # process start + importing the reward's module (math-verify: about 0.6 s)
# A call that found every worker busy for this long gets a new one: fast rewards (well under a
# millisecond each) never wait that long, so they keep to one or two processes.
GROW_AFTER_S = 0.05
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding megatron_spo/
_LIVE: "weakref.WeakSet[RewardPool]" = weakref.WeakSet()


class RewardWorkerError(RuntimeError):
    """A reward worker could not start (its message names the reward)."""


@dataclass
class Outcome:
    """What one call gave: ``kind`` is "ok" (``value`` = the function's result), "error" (``value`` =
    ``"TypeName: message"``) or "timeout"; ``seconds`` is the call's wall time in the worker."""

    kind: str
    value: Any
    seconds: float


class _Worker:
    """One child process and its end of the socket pair; ``ready`` once it has imported the reward."""

    def __init__(self, popen: subprocess.Popen, conn: Connection):
        self.popen = popen
        self.conn = conn
        self.ready = False

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self.conn.close()


class RewardPool:
    """Processes computing ``spec`` (``"module:qualname"`` of a reward function).

    Args:
        spec: import path of the function, resolved in each worker.
        workers: most processes at once (calls beyond that wait for a free one).
        timeout_s: hard limit of one call, counted from when a ready worker receives it.
        name: the reward's name in error messages.
    """

    def __init__(self, spec: str, *, workers: int = 4, timeout_s: float = DEFAULT_TIMEOUT_S, name: str = ""):
        if workers < 1 or not timeout_s > 0:
            raise ValueError(f"RewardPool: need workers >= 1 and timeout_s > 0, got {workers}, {timeout_s}")
        self.spec, self.workers, self.timeout_s = spec, workers, float(timeout_s)
        self.name = name or spec
        self._idle: List[_Worker] = []  # ready, or started and still importing
        self._busy: set = set()
        self._starting = 0
        self._cond = threading.Condition()
        self._spawner: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self.started = 0  # processes started so far (replacements included)
        _LIVE.add(self)

    # -- workers ----------------------------------------------------------------------------

    def _popen(self) -> _Worker:
        """Start one worker process and send it the init message (runs on the spawner thread: milliseconds)."""
        parent_end, child_end = socket.socketpair()
        code = (f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); from megatron_spo.rollout import reward_worker; "
                f"reward_worker.main({child_end.fileno()}, {os.getpid()})")
        try:
            popen = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child_end.fileno(),),
                                     stdin=subprocess.DEVNULL)
        finally:
            child_end.close()
        worker = _Worker(popen, Connection(parent_end.detach()))
        worker.conn.send(("init", list(sys.path), self.spec))
        self.started += 1
        return worker

    def _start(self) -> _Worker:
        with self._cond:
            if self._spawner is None:
                self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reward-spawner")
            spawner = self._spawner
        return spawner.submit(self._popen).result()

    def _wait_ready(self, worker: _Worker) -> None:
        """Wait (in the caller's thread, so boots overlap) until ``worker`` has imported the reward."""
        if worker.ready:
            return
        try:
            if not worker.conn.poll(BOOT_TIMEOUT_S):
                raise RewardWorkerError(f"reward {self.name}: worker not ready after {BOOT_TIMEOUT_S:.0f}s")
            kind, message = worker.conn.recv()
        except (EOFError, OSError) as e:
            raise RewardWorkerError(f"reward {self.name}: worker exited while starting "
                                    f"(code {worker.popen.wait()}): {type(e).__name__}") from None
        if kind != "ready":
            raise RewardWorkerError(f"reward {self.name}: worker cannot load {self.spec!r}: {message}")
        worker.ready = True

    def prestart(self) -> None:
        """Start the first worker now (milliseconds): it imports the reward while the caller goes on."""
        with self._cond:
            if self._idle or self._busy or self._starting:
                return
            self._starting += 1
        self._start_counted(busy=False)

    def _start_counted(self, busy: bool) -> _Worker:
        """Start a worker for a slot already counted in ``_starting``; it joins the busy set (the caller's)
        or the idle list."""
        worker = None
        try:
            worker = self._start()
        finally:
            with self._cond:
                self._starting -= 1
                if worker is not None and busy:
                    self._busy.add(worker)
                elif worker is not None:
                    self._idle.append(worker)
                self._cond.notify()
        return worker

    def _acquire(self) -> _Worker:
        """An idle worker; a new one only when none exists, or when the caller has waited ``GROW_AFTER_S``
        while every worker was computing (one still importing the reward will soon be free)."""
        since = time.monotonic()
        with self._cond:
            while True:
                if self._idle:
                    worker = self._idle.pop()
                    self._busy.add(worker)
                    return worker
                total = len(self._busy) + self._starting
                waited = time.monotonic() - since
                computing = not self._starting and all(w.ready for w in self._busy)
                if total < self.workers and (total == 0 or (waited >= GROW_AFTER_S and computing)):
                    self._starting += 1
                    break
                self._cond.wait(GROW_AFTER_S - waited if total < self.workers else None)
        return self._start_counted(busy=True)

    def _release(self, worker: _Worker, keep: bool) -> None:
        """Give ``worker`` back, or kill it and start its replacement now (it boots while nobody waits)."""
        with self._cond:
            owned = worker in self._busy  # not after close(), which took every worker
        replacement = None
        if not (keep and owned):
            worker.kill()
            if owned and worker.ready:  # a worker that never booted is not replaced: the next call says why
                try:
                    replacement = self._start()
                except (OSError, RuntimeError):  # cannot start one now (no processes left): the next call will
                    replacement = None
        with self._cond:
            self._busy.discard(worker)
            if keep and owned:
                self._idle.append(worker)
            if replacement is not None:
                self._idle.append(replacement)
            self._cond.notify()

    # -- calls ------------------------------------------------------------------------------

    def call(self, response: str, ground_truth: Any, sample: Any = None) -> Outcome:
        """``fn(response, ground_truth)`` (or ``..., sample=sample`` when ``sample`` is given) in a worker.

        Raises:
            RewardWorkerError: no worker could be started.
        """
        worker = self._acquire()
        keep = False
        try:
            self._wait_ready(worker)
        except BaseException:
            self._release(worker, keep)
            raise
        start = time.monotonic()
        try:
            worker.conn.send((response, ground_truth, sample))
            if not worker.conn.poll(self.timeout_s):
                return Outcome("timeout", None, time.monotonic() - start)
            kind, value = worker.conn.recv()
            keep = True
            return Outcome(kind, value, time.monotonic() - start)
        except (EOFError, OSError):  # the worker died (segfault, os._exit, out of memory)
            return Outcome("error", f"RewardWorkerError: worker exited with code {worker.popen.wait()}",
                           time.monotonic() - start)
        except Exception as e:  # noqa: BLE001 (the arguments could not be pickled): the worker is untouched
            keep = worker.popen.poll() is None
            return Outcome("error", f"{type(e).__name__}: {e}", time.monotonic() - start)
        finally:
            self._release(worker, keep)

    def close(self) -> None:
        """Kill every worker (idle or busy) and the spawner thread; a later call starts new workers."""
        with self._cond:
            workers, self._idle = self._idle + list(self._busy), []
            self._busy = set()
            spawner, self._spawner = self._spawner, None
        for w in workers:
            w.kill()
        if spawner is not None:
            spawner.shutdown(wait=True)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all() -> None:  # a worker stuck in a reward would otherwise outlive an interpreter that forgot close()
    for pool in list(_LIVE):
        pool.close()
