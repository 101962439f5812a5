"""Run a function in N local processes joined by a gloo (CPU) or nccl (GPU) process group.

Used by multi-process tests and small tools::

    results = run_distributed(fn, world_size=2, args=(x,))   # [fn(x) on rank 0, fn(x) on rank 1]

``fn`` must be importable by name (module level), because the children are *spawned* (a fresh
interpreter; fork is unsafe with torch threads). Each child gets MASTER_ADDR/MASTER_PORT/RANK/
WORLD_SIZE/LOCAL_RANK, one compute thread, and (by default) an initialised default process group.
Return values travel back pickled; an exception in any child is re-raised in the parent as
``DistributedError`` carrying the child's traceback; a child that hangs past ``timeout`` is killed.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence


class DistributedError(RuntimeError):
    """A child process raised; the message holds its rank and traceback."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn: Callable, args: Sequence, kwargs: Dict[str, Any],
           init_process_group: bool, results: Any, env: Dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        if init_process_group:
            import torch.distributed as dist

            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(rank % torch.cuda.device_count())
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        out = fn(*args, **kwargs)
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown must not mask the real result
            pass


def run_distributed(
    fn: Callable, world_size: int = 2, *, args: Sequence = (), kwargs: Optional[Dict[str, Any]] = None,
    timeout: float = 300.0, init_process_group: bool = True, env: Optional[Dict[str, str]] = None,
) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return the per-rank results.

    Args:
        fn: a module-level function (picklable by reference).
        world_size: number of processes.
        timeout: seconds for the whole run; on expiry all children are killed and TimeoutError raised.
        init_process_group: initialise the default process group in each child before calling fn.
        env: extra environment variables for the children.

    Raises:
        DistributedError: a child raised (the first failing rank's traceback is in the message).
        TimeoutError: not all ranks finished within ``timeout``.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    child_env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    child_env.update(env or {})
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, fn, tuple(args), dict(kwargs or {}),
                                         init_process_group, results, child_env), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outputs: Dict[int, Any] = {}
    failures: Dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"run_distributed({getattr(fn, '__name__', fn)}): ranks "
                                   f"{sorted(set(range(world_size)) - set(outputs) - set(failures))} "
                                   f"did not finish within {timeout:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and r not in outputs and r not in failures]
                # A child that died without reporting (segfault, os._exit) would otherwise hang us.
                time.sleep(0.5)
                for r in dead:
                    if r not in outputs and r not in failures and results.empty():
                        failures[r] = f"rank {r} exited with code {procs[r].exitcode} without a result"
                continue
            if ok:
                outputs[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                # The other ranks are likely blocked in a collective with the failed one.
                break
    finally:
        for proc in procs:
            proc.join(timeout=5 if not failures else 1)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failures:
        rank = min(failures)
        raise DistributedError(f"rank {rank} of {world_size} failed in "
                               f"{getattr(fn, '__name__', fn)}:\n{failures[rank]}")
    return [outputs[r] for r in range(world_size)]
