"""Run a function in a fresh spawned process with its output sent to a log file.

megatron's parallel state (and torch.distributed) is per process, so tools that run several
training runs one after another (the benchmarks) give each its own process.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable


def _logged(log_path: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return fn(*args, **kwargs)


def in_fresh_process(log_path: Path, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a new spawned process; its stdout/stderr go to ``log_path``.

    ``fn`` must be importable by the child (a module-level function). Exceptions are re-raised here.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_logged, str(log_path), fn, args, kwargs).result()
