"""Trainer checkpoints: model, optimizer, LR scheduler and caller state, saved atomically.

Storage is ``megatron.core.dist_checkpointing`` (torch_dist backend) inside an atomic step directory
(:mod:`megatron_spo.checkpoint_dir`)::

    root/step_00000042/
      dist/          the dist checkpoint: model and optimizer as ShardedTensors (reshardable:
                     saved at TP=2, loads at TP=1), common state, per-rank ShardedObjects
      hf/            optional copy of the HF config + tokenizer (for ``convert mcore-to-hf``)
      COMPLETE.json  manifest (files and sizes), written last
    root/latest

What is saved:

* ``model`` / ``model{i}`` (one per virtual pipeline chunk): ``GPTModel.sharded_state_dict()``;
* ``optimizer``: the Megatron optimizer's sharded state (Adam moments, step), resharded on load;
* common (rank 0's copy): step, the scheduler's ``state_dict()``, the parallel layout and
  ``caller_state`` -- a picklable dict the same on every rank (SPO tracker and sampler
  ``state_dict()``, data position, weight version, ...);
* per rank (a ShardedObject per global rank): the RNG states (python, numpy, torch, CUDA, and
  megatron's model-parallel RNG tracker) plus ``rank_state`` if given. They are restored only when
  the layout (world size, TP/PP/EP) is unchanged: otherwise rank r's RNG has no counterpart, and the
  load says so in a warning and returns ``rank_state=None``.

Scripts that call these functions must be guarded by ``if __name__ == "__main__":`` (the torch_dist
writer uses multiprocessing) and need ``psutil`` installed (without it a save hangs).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from megatron_spo import checkpoint_dir as cdir

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_RANK_KEY = "megatron_spo/rank_state"


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored.

    ``rank_state`` is this rank's ``rank_state`` dict (None if the layout changed); ``rng_restored``
    says whether the RNG states were put back.
    """

    path: Path
    step: int
    caller_state: Dict[str, Any]
    rank_state: Optional[Dict[str, Any]]
    rng_restored: bool


def rng_state() -> Dict[str, Any]:
    """All RNG states of this process (python, numpy, torch CPU, CUDA, megatron's RNG tracker)."""
    state: Dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    from megatron.core import tensor_parallel

    state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size()}


def _chunks(model) -> List[torch.nn.Module]:
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = []
    for c in chunks:
        while hasattr(c, "module"):
            c = c.module
        out.append(c)
    return out


def _sharded_state(model, optimizer, is_loading: bool) -> Dict[str, Any]:
    chunks = _chunks(model)
    if len(chunks) == 1:
        sd: Dict[str, Any] = {"model": chunks[0].sharded_state_dict()}
    else:
        sd = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(dict(sd), is_loading=is_loading)
    return sd


def _rank_object(data: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(_RANK_KEY, data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _shared_path(path: Optional[Path], error: Optional[BaseException] = None) -> Optional[Path]:
    """Rank 0's choice (or its error, raised on every rank), so all ranks agree on one directory."""
    box = [(str(path) if path is not None else None, error)]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    chosen, err = box[0]
    if err is not None:
        raise err
    return Path(chosen) if chosen is not None else None


def save_checkpoint(
    root: Union[str, Path], step: int, model, optimizer=None, scheduler=None, *,
    caller_state: Optional[Dict[str, Any]] = None, rank_state: Optional[Dict[str, Any]] = None,
    keep_last: Optional[int] = None, hf_dir: Optional[Union[str, Path]] = None,
) -> Path:
    """Save a trainer checkpoint for ``step`` under ``root``; collective over all ranks.

    Args:
        model: GPTModel chunk(s), possibly DDP-wrapped.
        optimizer: the Megatron optimizer (``get_megatron_optimizer``), or None.
        scheduler: anything with ``state_dict()/load_state_dict()`` (e.g. OptimizerParamScheduler).
        caller_state: picklable dict, identical on all ranks (rank 0's copy is stored).
        rank_state: picklable dict specific to this rank (stored next to its RNG states).
        keep_last: after publishing, keep only the newest N complete checkpoints.
        hf_dir: a HF model directory whose config/tokenizer files are copied into ``hf/``.

    Returns:
        the published directory ``root/step_XXXXXXXX``.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        tmp = cdir.prepare_temp_dir(root, step)
        (tmp / "dist").mkdir()
    tmp = _shared_path(cdir.temp_dir_for(root, step) if rank == 0 else None)
    dist.barrier()
    sd = _sharded_state(model, optimizer, is_loading=False)
    sd["common"] = {"format": FORMAT_VERSION, "step": int(step), "layout": _layout(),
                    "has_optimizer": optimizer is not None,
                    "caller": caller_state or {}, "scheduler": scheduler.state_dict() if scheduler is not None else None}
    sd["rank"] = _rank_object({"rng": rng_state(), "user": rank_state})
    dist_checkpointing.save(sd, str(tmp / "dist"))
    dist.barrier()
    final = cdir.step_dir_name(step)
    if rank == 0:
        if hf_dir is not None:
            from megatron_spo.convert.hf_io import copy_hf_metadata

            copy_hf_metadata(hf_dir, tmp / "hf")
        cdir.write_manifest(tmp, step, meta={"layout": _layout(), "format": FORMAT_VERSION})
        cdir.publish(tmp, root, step)
        if keep_last:
            cdir.prune(root, keep_last)
    dist.barrier()
    return root / final


def load_checkpoint(
    path: Union[str, Path], model, optimizer=None, scheduler=None, *, restore_rng: bool = True,
) -> Optional[LoadedCheckpoint]:
    """Load the newest complete checkpoint under ``path`` (a root) or exactly ``path`` (a step dir).

    Collective over all ranks. An incomplete or corrupt newer checkpoint is refused with a warning
    and the previous complete one is used; an explicitly named step directory that is incomplete
    raises :class:`~megatron_spo.checkpoint_dir.IncompleteCheckpointError`.

    Returns:
        None when ``path`` is a root with no checkpoint yet (a fresh run); else what was loaded.
    """
    from megatron.core import dist_checkpointing

    chosen, error = None, None
    if dist.get_rank() == 0:
        try:
            chosen = cdir.find_resumable(path)
        except (cdir.IncompleteCheckpointError, cdir.NoCheckpointError) as err:
            error = err
    chosen = _shared_path(chosen, error)
    if chosen is None:
        return None
    ddir = str(chosen / "dist")
    common = _common_state(chosen)
    if common.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {chosen}: format {common.get('format')!r}, this code reads {FORMAT_VERSION}")
    if optimizer is not None and not common.get("has_optimizer", False):
        raise ValueError(f"checkpoint {chosen} holds no optimizer state (e.g. written by `convert hf-to-mcore`); "
                         f"load it with optimizer=None and start the optimizer fresh")
    same_layout = common["layout"] == _layout()
    sd = _sharded_state(model, optimizer, is_loading=True)
    if same_layout:
        sd["rank"] = _rank_object(None)
    else:
        log.warning("checkpoint %s was saved with layout %s, now %s: weights and optimizer are resharded, "
                    "per-rank RNG/rank_state are not restored", chosen, common["layout"], _layout())
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        state = dist_checkpointing.load(sd, ddir)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 (torch's text is a multi-rank traceback)
        raise _unreadable(chosen / "dist", "its shards could not be loaded into this model", err) from None
    chunks = _chunks(model)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"], strict=True)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(state[f"model{i}"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if common["scheduler"] is None:
            raise ValueError(f"checkpoint {chosen} has no scheduler state, but a scheduler was passed")
        scheduler.load_state_dict(common["scheduler"])
    rank_state, rng_restored = None, False
    if same_layout:
        per_rank = state["rank"]
        rank_state = per_rank["user"]
        if restore_rng:
            set_rng_state(per_rank["rng"])
            rng_restored = True
    dist.barrier()
    return LoadedCheckpoint(path=chosen, step=int(common["step"]), caller_state=common["caller"],
                            rank_state=rank_state, rng_restored=rng_restored)


def read_caller_state(path: Union[str, Path]) -> Dict[str, Any]:
    """The ``caller_state`` of the newest complete checkpoint under ``path`` (a root or a step dir),
    read from the common state alone: no model, no process group (for inspection and tests)."""
    return _common_state(cdir.resolve(path))["caller"]


def _unreadable(where: Path, what: str, err: BaseException) -> cdir.UnreadableCheckpointError:
    """A one-line error naming ``where``: torch's own text is kept out when it advises ``weights_only=False``
    (unsafe, and never the fix for a corrupt file); the full error goes to the debug log."""
    log.debug("checkpoint %s: %s", where, what, exc_info=err)
    failures = getattr(err, "failures", None)  # torch's CheckpointException wraps each rank's (error, traceback)
    if isinstance(failures, dict) and failures:
        err = next(iter(failures.values()))[0]
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    if "weights" in detail.lower() and "only" in detail.lower():
        detail = "not a valid torch file"
    return cdir.UnreadableCheckpointError(f"checkpoint {where}: {what} ({type(err).__name__}: {detail}); "
                                          f"the file is corrupt or not written by megatron_spo")


def _common_state(chosen: Path) -> Dict[str, Any]:
    """The common state (rank 0's copy: step, layout, scheduler, caller state) of checkpoint ``chosen``."""
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(chosen / "dist"))["common"]
    except Exception as err:  # noqa: BLE001 (unpickling raises many types)
        raise _unreadable(chosen / "dist" / "common.pt", "cannot be read", err) from None
    if not isinstance(common, dict) or "format" not in common:
        raise cdir.UnreadableCheckpointError(f"checkpoint {chosen / 'dist' / 'common.pt'} holds no megatron_spo "
                                             f"common state")
    return common
