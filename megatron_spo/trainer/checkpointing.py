"""The trainer's checkpoints: what the loop stores next to the model and optimizer, saving, resuming.

The caller state of a checkpoint holds the loop's own counters and prompt stream plus the algorithm
family's state (:meth:`AlgorithmStep.state_dict`, e.g. SPO's ``sampler`` and ``tracker``), all at the
top level so that ``read_caller_state(...)["tracker"]`` finds SPO's tracker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from megatron_spo.config import Config
from megatron_spo.trainer.setup import Run

LOOP_KEYS = ("step", "weight_version", "stream")


def caller_state(run: Run) -> Dict[str, Any]:
    family = run.algorithm.state_dict()
    clash = sorted(set(family) & set(LOOP_KEYS))
    if clash:
        raise ValueError(f"{type(run.algorithm).__name__}.state_dict uses the loop's keys {clash}")
    return {"step": run.step, "weight_version": run.weight_version, "stream": run.stream.state_dict(), **family}


def save(run: Run) -> Path:
    from megatron_spo.megatron.checkpoint import save_checkpoint

    a = run.actor
    return save_checkpoint(Path(run.cfg.io.run_dir) / "checkpoints", run.step, a.model, a.optimizer, a.scheduler,
                           caller_state=caller_state(run), keep_last=run.cfg.io.keep_last, hf_dir=run.cfg.model.path)


def check_resume_path(cfg: Config) -> Path:
    """Where ``io.resume`` points ('auto': the run dir's checkpoints); an explicit path that does not exist
    is a ``NoCheckpointError`` naming it. Cheap: the loop calls it before anything is built."""
    from megatron_spo.checkpoint_dir import NoCheckpointError

    where = cfg.io.resume
    path = Path(cfg.io.run_dir) / "checkpoints" if where == "auto" else Path(where)
    if where not in ("auto", "none") and not path.exists():  # not a fresh start: the user named a checkpoint
        raise NoCheckpointError(f"io.resume={where!r}: {path} does not exist")
    return path


def resume(run: Run) -> bool:
    """``io.resume``: 'auto' continues from the newest complete checkpoint in the run dir, if any (none
    yet: a fresh start); a path (a checkpoint root or one step directory) loads that checkpoint, and
    is an error naming it when it does not exist or holds none. Returns whether a checkpoint was
    loaded (the caller then re-syncs the engines' weights).

    Raises:
        NoCheckpointError: an explicit ``io.resume`` path that does not exist or has no checkpoint.
    """
    from megatron_spo.checkpoint_dir import NoCheckpointError
    from megatron_spo.megatron.checkpoint import load_checkpoint

    where = run.cfg.io.resume
    if where == "none":
        return False
    path = check_resume_path(run.cfg)
    a = run.actor
    loaded = load_checkpoint(path, a.model, a.optimizer, a.scheduler)
    if loaded is None:
        if where != "auto":
            raise NoCheckpointError(f"io.resume={where!r}: no checkpoint under {path}")
        return False
    state = loaded.caller_state
    run.step, run.weight_version = int(state["step"]), int(state["weight_version"])
    run.stream.load_state_dict(state["stream"])
    run.algorithm.load_state_dict(state)
    if run.rank == 0:
        print(f"resumed from {loaded.path} at step {run.step}", flush=True)
    return True
