"""Collectives on the process group's device: how megatron_spo code outside megatron-core talks to
torch.distributed (the trainer's flags, metric sums, sample broadcasts and row gathers).

A process group serves only the device types of its backends: NCCL serves CUDA tensors, gloo CPU
(and CUDA) tensors, and ``cpu:gloo,cuda:nccl`` both. A tensor of a type the group does not serve
fails at the collective; a CPU tensor on an NCCL-only group says "No backend type associated with
device type cpu". Scalars built with ``torch.tensor(...)`` are CPU tensors, so every tensor collective
here moves its tensor to a device the group serves (:func:`group_device`: the current CUDA device
for NCCL) and hands the result back on the caller's device. Object collectives leave the device to
torch, which serialises onto the group's device itself (the current CUDA device for NCCL).

Collectives inside ``megatron_spo.megatron`` on the model's own tensors (the actor's normaliser and
metrics, the vocab-parallel log-prob reductions, weight export) already live on the model's device,
which is the group's device in a GPU run.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_distributed() -> bool:
    """torch.distributed is initialised (even with one rank: an NCCL world of one still needs CUDA tensors)."""
    return dist.is_available() and dist.is_initialized()


def served_device_types(group: Optional[Any] = None) -> Tuple[str, ...]:
    """Device types (``"cpu"``, ``"cuda"``, ...) whose tensors the group's backends accept."""
    name = str(dist.get_backend(group)).lower()
    if ":" in name:  # a multi-device group: "cpu:gloo,cuda:nccl"
        return tuple(part.split(":")[0].strip() for part in name.split(","))
    return tuple(dist.Backend.backend_capability.get(name, ("cpu",)))


def group_device(group: Optional[Any] = None) -> torch.device:
    """The device a tensor must be on for a collective over ``group``: CPU where the group serves CPU
    tensors (gloo), else the current CUDA device (NCCL), else the first type it serves."""
    types = served_device_types(group)
    if "cpu" in types:
        return torch.device("cpu")
    if types[0] == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(types[0])


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The one transfer of this module (a seam: the CPU test of the NCCL constraint replaces it)."""
    return t.to(device)


def all_reduce(t: torch.Tensor, op: str = "sum", group: Optional[Any] = None) -> torch.Tensor:
    """``t`` reduced elementwise over ``group`` (``op``: sum, max or min), returned on ``t``'s device.

    ``t`` stays where it is when the group serves its device type (then it is reduced in place),
    else it is copied to :func:`group_device` and back. Single process (not initialised): ``t``.
    """
    if not is_distributed():
        return t
    home = t.device
    moved = t if home.type in served_device_types(group) else _to_device(t, group_device(group))
    dist.all_reduce(moved, op=_OPS[op], group=group)
    return moved if moved is t else _to_device(moved, home)


def broadcast_objects(objects: List[Any], src: int = 0, group: Optional[Any] = None) -> List[Any]:
    """Rank ``src``'s picklable ``objects`` on every rank of ``group`` (the list is filled in place and returned)."""
    if is_distributed() and dist.get_world_size(group) > 1:
        dist.broadcast_object_list(objects, src=src, group=group)
    return objects


def all_gather_objects(obj: Any, group: Optional[Any] = None) -> Sequence[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not (is_distributed() and dist.get_world_size(group) > 1):
        return [obj]
    everyone: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, obj, group=group)
    return everyone
