"""Micro-batching by a token budget (dynamic batch size) for the Megatron actor.

A rank-local batch is a dict of tensors, rows = sequences, right-padded to a common length T:

    input_ids     [B, T] long   token ids (padding value irrelevant)
    lengths       [B]    long   real length of each row (>= 1)
    loss_mask     [B, T]        1 on tokens that are trained (response tokens), 0 elsewhere;
                                position 0 must be 0 (it has no log-prob)
    old_logp, advantages, rollout_logp, ref_logp   [B, T] float, optional per-token fields

Log-probs are aligned to tokens: ``logp[:, t] = log p(input_ids[:, t] | input_ids[:, :t])``.

Here micro-batches are padded batches: rows are trimmed to the longest row of their micro-batch and
right-padded (causal attention keeps real tokens independent of the padding; MoE routing is dropless,
so padding takes no expert capacity from them). The padding-free alternative (sequences concatenated
into rows, the actor's ``packing=True``) is ``packing.py``; it reuses ``make_micro_batches`` for the
per-sequence tensors.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

PER_TOKEN_KEYS = ("input_ids", "loss_mask", "old_logp", "advantages", "rollout_logp", "ref_logp")


def validate_batch(batch: Dict[str, torch.Tensor], max_positions: Optional[int] = None) -> None:
    """Check shapes and lengths of a rank-local batch; errors name the key, row and value."""
    for key in ("input_ids", "lengths", "loss_mask"):
        if key not in batch:
            raise KeyError(f"batch is missing {key!r} (have {sorted(batch)})")
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(ids.shape)}")
    n_rows, width = ids.shape
    if n_rows == 0:
        raise ValueError("empty batch: input_ids has 0 rows")
    lengths = batch["lengths"]
    if lengths.shape != (n_rows,):
        raise ValueError(f"lengths must be [B={n_rows}], got shape {tuple(lengths.shape)}")
    for key in PER_TOKEN_KEYS:
        if key in batch and batch[key] is not None and tuple(batch[key].shape) != (n_rows, width):
            raise ValueError(f"{key} must be [B, T]={(n_rows, width)}, got {tuple(batch[key].shape)}")
    for row, length in enumerate(lengths.tolist()):
        if not 1 <= length <= width:
            raise ValueError(f"lengths[{row}]={length} is outside [1, T={width}]")
        if max_positions is not None and length > max_positions:
            raise ValueError(f"sequence {row} has length {length} > the model's max positions {max_positions}")
    if bool(batch["loss_mask"][:, 0].any()):
        row = int(batch["loss_mask"][:, 0].nonzero()[0, 0])
        raise ValueError(f"loss_mask[{row}, 0] is set, but position 0 has no log-prob (no preceding token)")
    past_end = torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1)
    if bool((batch["loss_mask"].bool() & past_end).any()):
        row = int((batch["loss_mask"].bool() & past_end).any(1).nonzero()[0, 0])
        raise ValueError(f"loss_mask of row {row} marks tokens past its length {int(lengths[row])}")


def split_by_token_budget(lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Group row indices into micro-batches whose padded size ``rows * longest`` fits ``max_tokens``.

    Rows are taken longest first (so each micro-batch holds similar lengths and wastes little
    padding), greedily; a row longer than the budget gets a micro-batch of its own. Deterministic.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    groups: List[List[int]] = []
    current: List[int] = []
    longest = 0
    for i in order:
        length = int(lengths[i])
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        groups.append(current)
    return groups


def balance_to_count(lengths: Sequence[int], count: int) -> List[List[int]]:
    """Split rows into exactly ``count`` micro-batches of balanced padded cost (longest first).

    Used when ranks of an expert-/data-parallel group must run the same number of micro-batches.
    """
    if count > len(lengths):
        raise ValueError(f"cannot make {count} non-empty micro-batches from {len(lengths)} sequences")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    groups: List[List[int]] = [[] for _ in range(count)]
    for k, i in enumerate(order[:count]):
        groups[k].append(i)
    for i in order[count:]:
        # the longest row of a group is its first one; cost = rows * longest
        k = min(range(count), key=lambda g: ((len(groups[g]) + 1) * int(lengths[groups[g][0]]), g))
        groups[k].append(i)
    return groups


def equal_groups(lengths: Sequence[int], min_count: int, multiple: int) -> List[List[int]]:
    """Equal-sized micro-batches (longest rows together) whose count is a multiple of ``multiple``.

    The count is the smallest ``c >= min_count`` with ``c % multiple == 0`` that divides the number
    of rows. Needed by megatron's interleaved (virtual pipeline) schedule.
    """
    n = len(lengths)
    count = max(multiple, -(-min_count // multiple) * multiple)
    while count <= n and n % count:
        count += multiple
    if count > n:
        raise ValueError(f"{n} sequences cannot be split into equal micro-batches whose count is a multiple of "
                         f"{multiple} and >= {min_count} (virtual pipeline); use a batch size divisible by it")
    order = sorted(range(n), key=lambda i: (-int(lengths[i]), i))
    per = n // count
    return [order[k * per:(k + 1) * per] for k in range(count)]


def make_micro_batches(batch: Dict[str, torch.Tensor], groups: Sequence[Sequence[int]],
                       width_multiple: int = 1, width: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
    """Slice ``batch`` into micro-batches (rows in the given index order), trimmed to their longest row.

    ``width_multiple``: round each micro-batch's width up to a multiple (sequence parallelism needs
    the sequence divisible by the TP size); extra columns are zero padding with loss_mask 0.
    ``width``: use this width for every micro-batch instead of its longest row (fixed shapes).
    Each micro-batch also carries ``rows`` [b] (its row indices in ``batch``) and ``position_ids``.
    """
    out = []
    for k, group in enumerate(groups):
        if len(group) == 0:
            raise ValueError(f"micro-batch {k} is empty (no sequences)")
        rows = torch.as_tensor(list(group), dtype=torch.long)
        longest = int(batch["lengths"][rows].max())
        if width is not None and width < longest:
            raise ValueError(f"width={width} is shorter than micro-batch {k}'s longest row ({longest})")
        mb_width = longest if width is None else width
        mb_width = -(-mb_width // width_multiple) * width_multiple
        mb = {key: batch[key][rows, :mb_width] for key in PER_TOKEN_KEYS if batch.get(key) is not None}
        if mb_width > batch["input_ids"].shape[1]:  # only with width_multiple > 1
            mb = {key: torch.nn.functional.pad(v, (0, mb_width - v.shape[1])) for key, v in mb.items()}
        mb["lengths"] = batch["lengths"][rows]
        mb["rows"] = rows
        mb["position_ids"] = torch.arange(mb_width).unsqueeze(0).expand(len(group), mb_width)
        out.append(mb)
    return out


def scatter_rows(parts: Sequence[torch.Tensor], micro_batches: Sequence[Dict[str, torch.Tensor]],
                 shape: Sequence[int]) -> torch.Tensor:
    """Reassemble per-micro-batch [b, t] results into a zero-padded [B, T] tensor in batch row order."""
    out = torch.zeros(tuple(shape), dtype=parts[0].dtype)
    for part, mb in zip(parts, micro_batches):
        width = min(part.shape[1], out.shape[1])  # SP rounding may have widened a micro-batch
        out[mb["rows"], :width] = part[:, :width]
    return out


def shard_for_data_parallel(batch: Dict[str, torch.Tensor], dp_rank: int, dp_size: int) -> Dict[str, torch.Tensor]:
    """This DP rank's contiguous share of a global batch (B must be divisible by dp_size)."""
    n_rows = batch["input_ids"].shape[0]
    if n_rows % dp_size:
        raise ValueError(f"batch of {n_rows} sequences is not divisible by data-parallel size {dp_size}")
    per = n_rows // dp_size
    sl = slice(dp_rank * per, (dp_rank + 1) * per)
    return {k: (v[sl] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
