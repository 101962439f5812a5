"""The child side of the reward pool: one process that computes rewards with one reward function.

Started by :class:`~megatron_spo.rollout.reward_pool.RewardPool` as
``python -c "...reward_worker.main(FD, PARENT_PID)"`` with one end of a socket pair on ``FD``. The
protocol is pickled messages (``multiprocessing.connection.Connection``):

- parent -> child, first: ``("init", sys_path, spec)``; the child puts ``sys_path`` in place, imports
  ``spec`` (``"module:qualname"``) and answers ``("ready", None)`` or ``("boot_error", message)``;
- then per call: ``(response, ground_truth, sample_or_None)`` -> ``("ok", raw_result)`` or
  ``("error", "TypeName: message")``.

The reward runs in this process's main thread, so rewards that time themselves out with ``SIGALRM``
(math-verify) can. A call that never returns is the parent's to end: it kills this process. The child
also dies with the parent (``PR_SET_PDEATHSIG``) and exits when the parent closes its socket.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any, Callable

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Get SIGKILL when the parent's spawning thread ends; exit now if the parent is already gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the socket's EOF still ends an idle child
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def resolve(spec: str) -> Callable[..., Any]:
    """The function named ``"module:qualname"`` (a dotted qualname reaches into classes)."""
    module_name, _, qualname = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec!r} is not callable")
    return obj


def serve(conn: Connection) -> None:
    """Answer the init message, then reward calls until the parent closes the socket."""
    try:
        _, sys_path, spec = conn.recv()
    except EOFError:
        return
    sys.path[:] = list(sys_path)
    try:
        fn = resolve(spec)
    except Exception as e:  # noqa: BLE001 (reported to the parent, which names the reward)
        conn.send(("boot_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            response, ground_truth, sample = conn.recv()
        except EOFError:
            return
        try:
            raw = fn(response, ground_truth) if sample is None else fn(response, ground_truth, sample=sample)
            conn.send(("ok", raw))
        except Exception as e:  # noqa: BLE001 (a bad reward is this sample's problem; includes unpicklable results)
            conn.send(("error", f"{type(e).__name__}: {e}"))


def main(fd: int, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    # Ctrl-C, Slurm's SIGTERM and SIGUSR1 reach the whole process group: they are for the trainer, which
    # finishes its step (these rewards included) and then closes the pool
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        serve(conn)
    finally:
        conn.close()
