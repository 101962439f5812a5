"""Run metrics: a JSONL file and tensorboard events in the run directory, a live progress bar, and a
PNG of reward and key metrics over steps at the end. Only rank 0 writes; other ranks get a no-op.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

Number = Union[int, float]

# What the progress bar shows (label: metric), in order, when present.
BAR_KEYS = {"reward": "reward/mean", "loss": "loss", "gen_tok/s": "rollout/tokens_per_s"}
PLOT_KEYS = ("reward/mean", "loss", "grad_norm", "spo/value_mean", "spo/rho_mean", "mismatch/token_kl")


class MetricsLogger:
    """Append-only metrics sink for one run.

    Args:
        run_dir: the run directory (``metrics.jsonl`` and ``tb/`` are written inside).
        total_steps: length of the progress bar.
        enabled: False on non-zero ranks (every method is then a no-op).
        tensorboard: also write tensorboard event files.
        wandb_project: if set, also log to Weights & Biases (needs ``pip install wandb``).
        start_step: first step of this process (resumed runs continue the bar and the file).
    """

    def __init__(self, run_dir: Union[str, Path], total_steps: int, *, enabled: bool = True,
                 tensorboard: bool = True, wandb_project: Optional[str] = None, start_step: int = 0,
                 show_progress: bool = True) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        if wandb_project:
            from megatron_spo.optional import require

            self._wandb = require("wandb", "logging to Weights & Biases")
            self._wandb.init(project=wandb_project, dir=str(self.run_dir), resume="allow")
        if show_progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Dict[str, Number]) -> None:
        """Record ``metrics`` (scalars; non-finite values are kept in the JSONL as strings) for ``step``."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        record = {"step": step, "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._bar is not None:
            self._bar.set_postfix({label: f"{clean[k]:.3g}" for label, k in BAR_KEYS.items() if k in clean})
            self._bar.update(max(0, step + 1 - self._bar.n))

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Union[str, Path]) -> List[Dict[str, Number]]:
    """Read ``metrics.jsonl`` into one record per step: records of the same step are merged, later
    values winning (a resumed run re-logs a step; validation logs next to the training metrics)."""
    by_step: Dict[int, Dict[str, Number]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step.setdefault(int(rec["step"]), {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(jsonl_path: Union[str, Path], png_path: Union[str, Path],
                 keys: Optional[Sequence[str]] = None) -> Path:
    """Draw each of ``keys`` present in the JSONL over steps, one panel each, into ``png_path``.

    The default keys are :data:`PLOT_KEYS` plus every validation ``eval/<set>/avg@k`` curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(jsonl_path)
    if keys is None:
        keys = list(PLOT_KEYS) + sorted({k for r in records for k in r if k.startswith("eval/") and "/avg@" in k})
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    if not present:
        raise ValueError(f"plot_metrics: none of {list(keys)} appears in {jsonl_path}")
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.4 * len(present)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], present):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", linewidth=1)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


class PhaseClock:
    """``with clock(name, tokens=n):`` records ``time/<name>_s`` (and ``time/<name>_tokens_per_s``)."""

    def __init__(self, metrics: Dict[str, float]) -> None:
        self.metrics = metrics

    @contextmanager
    def __call__(self, name: str, tokens: Optional[float] = None):
        start = time.monotonic()
        yield
        seconds = time.monotonic() - start
        self.metrics[f"time/{name}_s"] = seconds
        if tokens is not None and seconds > 0:
            self.metrics[f"time/{name}_tokens_per_s"] = tokens / seconds
