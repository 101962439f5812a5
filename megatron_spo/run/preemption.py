"""Graceful stop on SIGTERM / SIGUSR1 (Slurm preemption and time limits).

The handler only sets a flag; the train loop checks it at the end of each step, writes a checkpoint
and exits 0, so a requeued job resumes with ``--resume auto``. With several ranks, every rank must
agree to stop at the same step: :meth:`PreemptionFlag.should_stop` all-reduces the flag (MAX) when
torch.distributed is initialised.
"""

from __future__ import annotations

import logging
import signal
from typing import Iterable

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Install handlers for ``signals`` that set a flag instead of killing the process."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal API)
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("received %s: will checkpoint and exit at the end of this step", self.signal_name)

    def should_stop(self) -> bool:
        """True on every rank if any rank received a signal (collective when distributed is up)."""
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        return self.requested

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
