"""Tensor-parallel split and merge of full Megatron tensors (pure torch, no communication).

A full Megatron tensor (see :mod:`megatron_spo.convert.mapping`) is split over ``tp`` ranks the way
megatron.core's layers hold it:

* ``column`` (ColumnParallelLinear, VocabParallelEmbedding, and ``linear_qkv``): rank r holds the
  r-th contiguous chunk of dim 0. For QKV this is a whole number of query groups when
  ``ng >= tp``; when ``ng < tp`` a group's rows span ranks and megatron all-gathers them in the
  forward pass, so the weight split is still contiguous;
* ``row`` (RowParallelLinear): rank r holds the r-th chunk of dim 1;
* ``glu_column`` (fused ``[gate; up]`` of a gated MLP): rank r holds ``[gate chunk r; up chunk r]``,
  because ``MLP.forward`` chunks the *local* fc1 output in two;
* ``replicated``: every rank holds the full tensor.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from megatron_spo.convert.mapping import COLUMN, GLU_COLUMN, REPLICATED, ROW


def _check(name: str, size: int, parts: int, what: str) -> None:
    if size % parts:
        raise ValueError(f"{name}: {what} size {size} is not divisible by tensor-parallel size {parts}")


def shard(full: torch.Tensor, split: str, rank: int, size: int, name: str = "tensor") -> torch.Tensor:
    """The slice of ``full`` that TP rank ``rank`` of ``size`` holds (a view where possible)."""
    if not 0 <= rank < size:
        raise ValueError(f"{name}: TP rank {rank} out of range for size {size}")
    if split == REPLICATED or size == 1:
        return full
    if split == COLUMN:
        _check(name, full.shape[0], size, "dim 0")
        return torch.chunk(full, size, dim=0)[rank]
    if split == ROW:
        _check(name, full.shape[1], size, "dim 1")
        return torch.chunk(full, size, dim=1)[rank]
    if split == GLU_COLUMN:
        _check(name, full.shape[0], 2 * size, "dim 0 (gate+up)")
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, dim=0)[rank], torch.chunk(up, size, dim=0)[rank]], dim=0)
    raise ValueError(f"{name}: unknown TP split {split!r}")


def unshard(shards: Sequence[torch.Tensor], split: str, name: str = "tensor") -> torch.Tensor:
    """Rebuild the full tensor from the shards of all TP ranks (in rank order); inverse of :func:`shard`."""
    if not shards:
        raise ValueError(f"{name}: no shards given")
    if split == REPLICATED or len(shards) == 1:
        return shards[0]
    if split == COLUMN:
        return torch.cat(list(shards), dim=0)
    if split == ROW:
        return torch.cat(list(shards), dim=1)
    if split == GLU_COLUMN:
        halves: List[tuple] = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"{name}: unknown TP split {split!r}")


def full_shape(local_shape: Sequence[int], split: str, size: int) -> tuple:
    """Shape of the full tensor given one rank's shard shape."""
    shape = list(local_shape)
    if split in (COLUMN, GLU_COLUMN):
        shape[0] *= size
    elif split == ROW:
        shape[1] *= size
    return tuple(shape)
