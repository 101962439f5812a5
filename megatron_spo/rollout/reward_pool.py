"""A pool of reward worker processes with a hard per-call timeout: a reward that never returns is killed.

A reward computed in a thread of the trainer cannot be stopped: a grader stuck in C code (sympy on
``9^{9^{9^{9^{9}}}}``) holds the interpreter lock, so no timeout fires and SIGTERM is never handled.
:class:`RewardPool` runs the function in separate processes instead
(:mod:`megatron_spo.rollout.reward_worker`): a call that takes longer than ``timeout_s`` is answered
with a timeout, its worker is killed (SIGKILL) and a fresh one is started for a later call.

Workers are persistent (started lazily, up to ``workers`` at once, one per concurrent caller), so a
call costs one pickled round trip over a socket pair, not a process start. They are started from one
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

import megatron_spo

DEFAULT_TIMEOUT_S = 10.0  # well below the 30 s a preempted trainer has to checkpoint and exit
BOOT_TIMEOUT_S = 60.0  # process start + importing the reward's module (math-verify: about 0.6 s)
_PACKAGE_ROOT = str(Path(megatron_spo.__file__).resolve().parent.parent)
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
    def __init__(self, popen: subprocess.Popen, conn: Connection):
        self.popen = popen
        self.conn = conn

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
        self._idle: List[_Worker] = []
        self._busy: set = set()
        self._starting = 0
        self._cond = threading.Condition()
        self._spawner: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self.started = 0  # processes started so far (replacements included)
        _LIVE.add(self)

    # -- workers ----------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        """Start one worker and wait until it has imported the reward (runs on the spawner thread)."""
        parent_end, child_end = socket.socketpair()
        code = (f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); from megatron_spo.rollout import reward_worker; "
                f"reward_worker.main({child_end.fileno()}, {os.getpid()})")
        try:
            popen = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child_end.fileno(),),
                                     stdin=subprocess.DEVNULL)
        finally:
            child_end.close()
        worker = _Worker(popen, Connection(parent_end.detach()))
        try:
            worker.conn.send(("init", list(sys.path), self.spec))
            if not worker.conn.poll(BOOT_TIMEOUT_S):
                raise RewardWorkerError(f"reward {self.name}: worker not ready after {BOOT_TIMEOUT_S:.0f}s")
            kind, message = worker.conn.recv()
        except (EOFError, OSError) as e:
            worker.kill()
            raise RewardWorkerError(f"reward {self.name}: worker exited while starting "
                                    f"(code {popen.poll()}): {type(e).__name__}") from None
        except BaseException:
            worker.kill()
            raise
        if kind != "ready":
            worker.kill()
            raise RewardWorkerError(f"reward {self.name}: worker cannot load {self.spec!r}: {message}")
        self.started += 1
        return worker

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._idle:
                    worker = self._idle.pop()
                    self._busy.add(worker)
                    return worker
                if len(self._busy) + self._starting < self.workers:
                    self._starting += 1
                    break
                self._cond.wait()
        try:
            if self._spawner is None:
                with self._cond:
                    if self._spawner is None:
                        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reward-spawner")
            worker = self._spawner.submit(self._spawn).result()
        except BaseException:
            with self._cond:
                self._starting -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._starting -= 1
            self._busy.add(worker)
        return worker

    def _release(self, worker: _Worker, keep: bool) -> None:
        if not keep:
            worker.kill()
        with self._cond:
            self._busy.discard(worker)
            if keep:
                self._idle.append(worker)
            self._cond.notify()

    # -- calls ------------------------------------------------------------------------------

    def call(self, response: str, ground_truth: Any, sample: Any = None) -> Outcome:
        """``fn(response, ground_truth)`` (or ``..., sample=sample`` when ``sample`` is given) in a worker.

        Raises:
            RewardWorkerError: no worker could be started.
        """
        worker = self._acquire()
        start = time.monotonic()
        keep = False
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
