"""Small object / scalar collectives the train loop needs (no-ops in a single process).

They go through ``megatron_spo.megatron.group_device``, which puts tensors on the process group's
device (CUDA under NCCL), so they work on a GPU world as on a gloo one.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from megatron_spo.megatron import group_device


def _distributed() -> bool:
    import torch.distributed as dist

    return group_device.is_distributed() and dist.get_world_size() > 1


def gather_rows(local: Dict[int, Any]) -> Dict[int, Any]:
    """Union over all ranks of ``{batch row: value}`` dicts (ranks of one DP shard send the same rows)."""
    if not _distributed():
        return dict(local)
    merged: Dict[int, Any] = {}
    for part in group_device.all_gather_objects(local):
        merged.update(part)
    return merged


def reduce_sum_max(values: Dict[str, float]) -> Dict[str, float]:
    """All-reduce a dict of floats over the world: keys ending in ``_max`` by MAX, the rest by SUM.

    Every rank must pass the same keys. Ranks holding the same data-parallel shard (TP/PP peers)
    would count it more than once, so pass values only from one rank per shard and zeros elsewhere.
    """
    if not _distributed():
        return dict(values)
    out = {}
    for key in sorted(values):
        t = torch.tensor([values[key]], dtype=torch.float64)
        out[key] = float(group_device.all_reduce(t, "max" if key.endswith("_max") else "sum"))
    return out
