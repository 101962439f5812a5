"""Graceful stop on SIGTERM / SIGUSR1 (Slurm preemption and time limits).

The handler only sets a flag; the train loop checks it at the end of each step, writes a checkpoint
and exits 0, so a requeued job resumes with ``--resume auto``. With several ranks, every rank must
agree to stop at the same step: :meth:`PreemptionFlag.should_stop` all-reduces the flag (MAX) when
torch.distributed is initialised.

A stop file is the second way in: under ``srun`` + ``torchrun`` a signal sent to the job step also
reaches the torchrun agent, which then terminates its workers after a short grace period, too short
for a large checkpoint. The sbatch scripts therefore trap the signal in the batch shell
(``#SBATCH --signal=B:USR1@300``) and create ``<run_dir>/STOP``; any rank that sees the file stops
the run the same way. The file is removed once the checkpoint is written.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Iterable, Optional, Union

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Install handlers for ``signals`` that set a flag instead of killing the process."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS,
                 stop_file: Optional[Union[str, Path]] = None) -> None:
        self.requested = False
        self.signal_name = ""
        self.stop_file = Path(stop_file) if stop_file is not None else None
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

        from megatron_spo.megatron import group_device

        if self.stop_file is not None and self.stop_file.exists() and not self.requested:
            self.requested = True
            self.signal_name = f"stop file {self.stop_file}"
            log.warning("found %s: will checkpoint and exit at the end of this step", self.stop_file)
        if group_device.is_distributed():  # on the group's device: an NCCL group refuses CPU tensors
            flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
            return bool(group_device.all_reduce(flag, "max").item())
        return self.requested

    def clear_stop_file(self) -> None:
        """Remove the stop file (after the checkpoint), so the requeued job does not stop at once."""
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
