"""Small object / scalar collectives the train loop needs (no-ops in a single process)."""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(local: Dict[int, Any]) -> Dict[int, Any]:
    """Union over all ranks of ``{batch row: value}`` dicts (ranks of one DP shard send the same rows)."""
    if not _distributed():
        return dict(local)
    everyone: List[Dict[int, Any]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, local)
    merged: Dict[int, Any] = {}
    for part in everyone:
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
        dist.all_reduce(t, op=dist.ReduceOp.MAX if key.endswith("_max") else dist.ReduceOp.SUM)
        out[key] = float(t)
    return out
