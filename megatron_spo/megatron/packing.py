"""Padding-free packing: a batch's sequences concatenated into the rows of a micro-batch.

Padded micro-batches (``batching.make_micro_batches``) cost ``rows x longest`` tokens each; with
lengths spread over 64..1024 that is 1.3-1.7x the real tokens. Packing fills rows instead:

* local spec (CPU, explicit attention mask): rows of width ``W`` = the batch's longest sequence,
  filled best-fit-decreasing; a micro-batch holds ``max(1, budget // W)`` rows, so its model input
  is ``[R, W]`` with ``R * W <= micro_batch_tokens`` (or one row when a sequence exceeds the budget).
  Every token gets its position inside its own sequence (restarting at 0) and a segment id; the
  attention mask is block-diagonal causal over segments (``block_causal_mask``).
* THD (Transformer Engine, GPU): one row per micro-batch (``[1, T]``, ``T <= budget``) and the
  sequence boundaries as ``cu_seqlens`` for ``PackedSeqParams`` (``packed_forward.py``).

A packed micro-batch keeps every per-sequence tensor of the padded path (``input_ids``,
``loss_mask``, ``old_logp``, ... as ``[b, w]``, ``lengths``, ``rows``) and adds the model input:

    packed_ids  [R, W] long   token ids, rows of concatenated sequences, 0 in the tail
    packed_pos  [R, W] long   position of each token inside its sequence (tails count from 0 too)
    packed_seg  [R, W] long   segment id: j for the micro-batch's j-th sequence, b + r for row r's tail
    packed_src  [b, w] long   flat index (r * W + column) of token t of sequence j; 0 past its length
    cu_seqlens  [n + 1] int32 THD only: segment boundaries in the single row (the tail is a segment)

Log-probs are computed on the packed hidden states and gathered back into ``[b, w]``, so losses,
their normalisers (``algos/aggregation.py``: per-token and per-sequence sums over the same rows)
and every metric see exactly the rows of the padded path.

MoE: the router sees each real token's hidden state as in the padded path, so every token picks the
same experts; only the load-balancing aux loss (off by default) changes, because it averages over
the tokens computed, and the padded path routes its padding too.

A plan is ``List[micro-batch]``, a micro-batch ``List[row]``, a row ``List[sequence index]``.
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Sequence

import torch

from megatron_spo.megatron import batching

Plan = List[List[List[int]]]


def pack_rows(lengths: Sequence[int], capacity: int, order: Sequence[int]) -> List[List[int]]:
    """Best-fit-decreasing: the sequences of ``order``, longest first, each into the fullest row it fits.

    A sequence longer than ``capacity`` gets a row of its own. Rows come back fullest first (so a
    micro-batch's rows have similar fills and its width wastes little). Deterministic (ties by
    index); O(n log n) with a sorted list of (free tokens, row).
    """
    rows: List[List[int]] = []
    fill: List[int] = []
    free: List[tuple] = []  # sorted (free tokens, row index)
    for i in sorted(order, key=lambda i: (-int(lengths[i]), i)):
        length = int(lengths[i])
        k = bisect.bisect_left(free, (length, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
        else:
            room, r = capacity, len(rows)
            rows.append([i])
            fill.append(0)
        fill[r] += length
        if room - length > 0:
            bisect.insort(free, (room - length, r))
    return [rows[r] for r in sorted(range(len(rows)), key=lambda r: (-fill[r], r))]


def row_capacity(lengths: Sequence[int], budget: int, thd: bool) -> int:
    """Tokens per row: the longest sequence (local spec), or the whole budget (THD, one row per micro-batch)."""
    longest = max(int(n) for n in lengths)
    return max(budget, longest) if thd else longest


def plan_packing(lengths: Sequence[int], budget: int, thd: bool = False) -> Plan:
    """Pack all sequences into micro-batches of at most ``budget`` computed tokens (see module docstring)."""
    if budget < 1:
        raise ValueError(f"max_tokens={budget} must be >= 1")
    capacity = row_capacity(lengths, budget, thd)
    rows = pack_rows(lengths, capacity, range(len(lengths)))
    per = 1 if thd else max(1, budget // capacity)
    return [rows[k:k + per] for k in range(0, len(rows), per)]


def plan_from_groups(lengths: Sequence[int], groups: Sequence[Sequence[int]], budget: int, thd: bool = False) -> Plan:
    """One micro-batch per given row group, its sequences packed into rows (one row with THD)."""
    capacity = row_capacity(lengths, budget, thd)
    plan = []
    for k, group in enumerate(groups):
        if len(group) == 0:
            raise ValueError(f"micro-batch {k} is empty (no sequences)")
        plan.append([list(group)] if thd else pack_rows(lengths, capacity, list(group)))
    return plan


def rebalance(plan: Plan, count: int) -> Plan:
    """The plan's rows regrouped into exactly ``count`` (>= the plan's) micro-batches.

    Needed when ranks of a data-/expert-parallel group must run the same number of micro-batches,
    or the interleaved schedule needs a multiple of pp. Rows are split (their last sequence moved to
    a new row) until there are at least ``count``, then dealt out in contiguous runs whose sizes
    differ by at most one: never more rows per micro-batch than before. With one row per
    micro-batch (THD) this gives one row each again.
    """
    rows = [list(row) for mb in plan for row in mb]
    n = sum(len(row) for row in rows)
    if count > n:
        raise ValueError(f"cannot make {count} non-empty micro-batches from {n} sequences")
    while len(rows) < count:
        k = max(range(len(rows)), key=lambda r: (len(rows[r]), -r))
        rows.append([rows[k].pop()])
    per, extra = divmod(len(rows), count)
    out, start = [], 0
    for c in range(count):
        size = per + (c < extra)
        out.append(rows[start:start + size])
        start += size
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_packed_micro_batches(batch: Dict[str, torch.Tensor], plan: Plan, *, width_multiple: int = 1,
                              fixed_shape: bool = False, thd: bool = False) -> List[Dict[str, torch.Tensor]]:
    """Build the micro-batches of ``plan`` (keys in the module docstring).

    ``width_multiple``: round the packed width up (sequence parallelism shards it over TP ranks).
    ``fixed_shape``: every micro-batch gets the same ``[R, W]`` (the largest), padding rows being all
    tail — megatron's interleaved schedule exchanges fixed shapes between virtual stages.
    """
    lengths = [int(n) for n in batch["lengths"].tolist()]
    ids = batch["input_ids"]
    shapes = []
    for k, mb in enumerate(plan):
        if not mb or not all(mb):
            raise ValueError(f"micro-batch {k} is empty (no sequences)")
        shapes.append((len(mb), max(sum(lengths[s] for s in row) for row in mb)))
    if fixed_shape:
        shapes = [(max(r for r, _ in shapes), max(w for _, w in shapes))] * len(plan)
    out = []
    for mb, (n_rows, width) in zip(plan, shapes):
        width = _round_up(width, width_multiple)
        seqs = [s for row in mb for s in row]
        per_seq = batching.make_micro_batches(batch, [seqs])[0]
        per_seq.pop("position_ids")  # the packed input has its own positions
        b, w = per_seq["input_ids"].shape
        packed_ids = torch.zeros(n_rows, width, dtype=ids.dtype)
        packed_pos = torch.zeros(n_rows, width, dtype=torch.long)
        packed_seg = torch.zeros(n_rows, width, dtype=torch.long)
        packed_src = torch.zeros(b, w, dtype=torch.long)
        bounds, j = [0], 0
        for r in range(n_rows):
            col = 0
            for s in (mb[r] if r < len(mb) else []):
                n = lengths[s]
                packed_ids[r, col:col + n] = ids[s, :n]
                packed_pos[r, col:col + n] = torch.arange(n)
                packed_seg[r, col:col + n] = j
                packed_src[j, :n] = r * width + col + torch.arange(n)
                col += n
                j += 1
                bounds.append(r * width + col)
            if col < width:  # the tail: its own causal block, so no real token sees it
                packed_pos[r, col:] = torch.arange(width - col)
                packed_seg[r, col:] = b + r
                bounds.append((r + 1) * width)
        per_seq.update(packed_ids=packed_ids, packed_pos=packed_pos, packed_seg=packed_seg, packed_src=packed_src)
        if thd:
            per_seq["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
        out.append(per_seq)
    return out


def computed_tokens(mb: Dict[str, torch.Tensor]) -> int:
    """Tokens the model computes for one micro-batch: ``R * W`` packed, ``b * w`` padded."""
    return int((mb["packed_ids"] if "packed_ids" in mb else mb["input_ids"]).numel())


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[R, W] segment ids -> [R, 1, W, W] bool attention mask, True = masked (megatron's convention).

    Token i may attend to token j iff both are in the same segment and j <= i; with a single segment
    per row this is the ordinary causal mask.
    """
    width = segments.shape[1]
    same = segments.unsqueeze(2) == segments.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril_()
    return (~(same & causal)).unsqueeze(1)
