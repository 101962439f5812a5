"""The NCCL constraint on a CPU machine: collectives that refuse CPU tensors (tests/trainer/test_collectives.py).

On a GPU, an NCCL process group serves only CUDA tensors: a CPU tensor fails at the collective with
"No backend type associated with device type cpu". On CPU there is no second device that can hold
data (``meta`` tensors have none, a CUDA-only group cannot be fed here at all), so this module builds
the constraint from three parts and leaves the code under test unchanged:

1. a fake accelerator: ``meta`` stands for its device type, and a tensor "on" it is a CPU tensor of
   the :class:`OnAccelerator` subclass (same bytes, so gloo still moves them for real);
2. the group's view from ``megatron_spo.megatron.group_device``: the group serves only that device
   type, its device is ``meta``, and the module's one transfer (``_to_device``) moves tensors onto
   the fake accelerator and back. Only the physical copy is replaced; the helper's decisions (what
   to move, where, and back) run as written;
3. torch.distributed's collectives wrapped to refuse, as NCCL does, any tensor not on the fake
   accelerator when called from megatron_spo code outside ``megatron_spo.megatron`` (the trainer,
   algorithm families, rollout glue); object collectives and barriers from that code must come
   through the helper too. megatron-core's own collectives and those of ``megatron_spo.megatron``
   run on the model's tensors, which live on the CUDA device in a GPU run; they pass unchecked.

Run a trainer under it with ``python -m torch.distributed.run ... -m strict_collectives <train args>``
(the tests dir on PYTHONPATH). Each rank writes ``$STRICT_COLLECTIVES_REPORT/rank<r>.json`` at exit:
the collectives it checked, by the module that asked the helper (``via``).
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

HELPER = "megatron_spo.megatron.group_device"
FAKE = torch.device("meta")
NCCL_MESSAGE = "No backend type associated with device type cpu"
TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                      "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
                      "send", "recv", "isend", "irecv")
OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                      "barrier", "monitored_barrier")
calls: "collections.Counter[str]" = collections.Counter()


class OnAccelerator(torch.Tensor):
    """A CPU tensor that counts as living on the fake accelerator."""


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The stand-in for ``t.to(device)`` between the CPU and the fake accelerator (a copy, as on a GPU)."""
    if device.type == FAKE.type:
        return t.detach().clone().as_subclass(OnAccelerator)
    if isinstance(t, OnAccelerator):
        return t.as_subclass(torch.Tensor).to(device).clone()
    return t.to(device)


def checked(module: str) -> bool:
    """Collectives asked for by this module must meet the constraint."""
    return module.startswith("megatron_spo") and (module == HELPER or not module.startswith("megatron_spo.megatron"))


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if torch.is_tensor(a):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if torch.is_tensor(x))


def _caller(depth: int) -> str:
    return sys._getframe(depth).f_globals.get("__name__", "")


def _wrap_tensor(name: str, real):
    def collective(*args, **kwargs):
        module = _caller(2)
        if checked(module):
            if any(not isinstance(t, OnAccelerator) for t in _tensors(args, kwargs)):
                raise RuntimeError(f"{NCCL_MESSAGE} ({name} from {module})")
            calls[f"{name} via {_caller(3) if module == HELPER else module}"] += 1
        return real(*args, **kwargs)
    return collective


def _wrap_object(name: str, real):
    def collective(*args, **kwargs):
        module = _caller(2)
        if checked(module):
            if module != HELPER:
                raise RuntimeError(f"{name} from {module}: collectives outside megatron-core must go through {HELPER}")
            calls[f"{name} via {_caller(3)}"] += 1
        return real(*args, **kwargs)
    return collective


def install() -> None:
    """Put the constraint in place (before the code under test runs)."""
    from megatron_spo.megatron import group_device

    group_device.served_device_types = lambda group=None: (FAKE.type,)
    group_device.group_device = lambda group=None: FAKE
    group_device._to_device = to_device
    for name in TENSOR_COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _wrap_tensor(name, getattr(dist, name)))
    for name in OBJECT_COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _wrap_object(name, getattr(dist, name)))


def _write_report() -> None:
    out = os.environ.get("STRICT_COLLECTIVES_REPORT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(dict(calls)))


if __name__ == "__main__":
    install()
    atexit.register(_write_report)
    from megatron_spo.commands.train import main

    sys.exit(main())
