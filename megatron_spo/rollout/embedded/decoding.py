"""The embedded engine's decode loop: one left-padded prefill, then one ``[B, 1]`` step per token.

Requests are batched left-padded: ``input_ids``/``attention_mask`` ``[B, P]`` with
``position_ids = cumsum(mask) - 1``, one prefill forward, then one ``[B, 1]`` decode forward per
step reusing an HF KV cache (a preallocated ``StaticCache`` by default, so no per-step
concatenation). Rows that finish are dropped from the batch (and the cache), so a long tail does
not pay for finished rows. HF ``generate`` is not used: it cannot return the untruncated sampling
log-probs at temperature != 1 without storing ``[B, N, V]`` logits.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from megatron_spo.rollout.engine import GenerateResult, SamplingParams
from megatron_spo.rollout.sampling import StopStringMatcher, sample


@dataclass
class Request:
    """One validated request: prompt ids ``[P]``, its sampling, and where its result goes."""

    prompt: List[int]
    sampling: SamplingParams
    request_id: str
    future: Optional[concurrent.futures.Future] = None
    aborted: bool = False


@dataclass
class Row:
    """Decode state of one request in a running batch."""

    req: Request
    stopper: StopStringMatcher
    stop_ids: frozenset
    limit: int  # max tokens this row may generate (max_new_tokens clipped to the context)
    generator: Optional[torch.Generator]
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)


def new_row(req: Request, tokenizer, eos_ids: frozenset, max_context: int) -> Row:
    """The decode state of ``req``: its stop ids (eos unless ignored), token limit and own generator."""
    s = req.sampling
    stop_ids = set(s.stop_token_ids)
    if not s.ignore_eos:
        stop_ids |= eos_ids
    gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
    limit = min(s.max_new_tokens, max_context - len(req.prompt))
    return Row(req, StopStringMatcher(tokenizer, s.stop), frozenset(stop_ids), limit, gen)


def new_cache(model, impl: str, total_len: int):
    """An empty KV cache for ``total_len`` positions: HF ``StaticCache`` ("static") or ``DynamicCache``."""
    from transformers import DynamicCache, StaticCache

    if impl == "static":
        return StaticCache(config=model.config, max_cache_len=total_len)
    return DynamicCache(config=model.config)


def select_rows(cache, sel: torch.Tensor) -> None:
    """Keep only batch rows ``sel`` (``[B']`` indices) of the KV cache (finished rows leave the batch)."""
    from transformers import StaticCache

    if not isinstance(cache, StaticCache):
        cache.batch_select_indices(sel)
        return
    for layer in cache.layers:  # StaticLayer has no batch_select_indices: index its buffers
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys.index_select(0, sel)
            layer.values = layer.values.index_select(0, sel)
            layer.batch_size = int(sel.numel())


def _settings(rows: List[Row], idx: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row temperature, top-k and top-p of the active rows ``idx``, each ``[B]``."""
    ss = [rows[i].req.sampling for i in idx]
    return (torch.tensor([s.temperature for s in ss], dtype=torch.float32),
            torch.tensor([s.top_k for s in ss], dtype=torch.long),
            torch.tensor([s.top_p for s in ss], dtype=torch.float32))


def _finish_reason(row: Row, tok: int, aborted: bool) -> Tuple[Optional[str], object]:
    """Why ``row`` stops after sampling ``tok`` (None: it goes on), and the matched stop token/string."""
    if tok in row.stop_ids:
        return "stop", tok
    hit = row.stopper.match(row.tokens)
    if hit is not None:
        return "stop", hit
    if len(row.tokens) >= row.limit:
        return "length", None
    if aborted or row.req.aborted:
        return "abort", None
    return None, None


@torch.no_grad()
def decode_batch(model, rows: List[Row], *, pad_id: int, cache_impl: str, generator: torch.Generator,
                 version: int, aborted: Callable[[], bool],
                 on_step: Callable[[int], None]) -> List[GenerateResult]:
    """Generate every row to its end; one result per row, in order.

    Args:
        model: the HF causal LM.
        rows: decode states from :func:`new_row` (prompts of any lengths).
        pad_id: id written into the left padding (masked out).
        cache_impl: "static" or "dynamic" (see :func:`new_cache`).
        generator: generator of rows without their own seed (advanced in place).
        version: weight version stamped on every result.
        aborted: polled once per step; True finishes every remaining row with "abort".
        on_step: called with the number of tokens each step generated (the engine's counter).
    """
    reqs = [r.req for r in rows]
    results: List[Optional[GenerateResult]] = [None] * len(rows)
    width = max(len(r.prompt) for r in reqs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(reqs):
        ids[i, width - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
        mask[i, width - len(r.prompt):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = new_cache(model, cache_impl, width + max(r.limit for r in rows))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True, cache_position=torch.arange(width), logits_to_keep=1).logits[:, -1]
    filled = width  # cache slots written so far (same for every row: rows are left-padded)
    next_pos = pos[:, -1] + 1
    active = list(range(len(rows)))
    temp, top_k, top_p = _settings(rows, active)
    while True:
        tok, lp = sample(logits, temp, top_k, top_p, generator, [rows[i].generator for i in active])
        tok_list, lp_list = tok.tolist(), lp.tolist()
        aborted_all = aborted()
        keep: List[int] = []
        for j, i in enumerate(active):
            row = rows[i]
            row.tokens.append(tok_list[j])
            row.logprobs.append(lp_list[j])
            reason, matched = _finish_reason(row, tok_list[j], aborted_all)
            if reason is None:
                keep.append(j)
                continue
            meta = {"request_id": row.req.request_id, "matched": matched,
                    "context_truncated": reason == "length" and row.limit < row.req.sampling.max_new_tokens}
            results[i] = GenerateResult(row.tokens, row.logprobs, reason, version, len(row.req.prompt), meta)
        on_step(len(active))
        if not keep:
            break
        if len(keep) < len(active):
            sel = torch.tensor(keep, dtype=torch.long)
            select_rows(cache, sel)
            mask, next_pos, tok = mask[sel], next_pos[sel], tok[sel]
            active = [active[j] for j in keep]
            temp, top_k, top_p = _settings(rows, active)
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       past_key_values=cache, use_cache=True,
                       cache_position=torch.tensor([filled])).logits[:, -1]
        filled += 1
        next_pos = next_pos + 1
    return results  # type: ignore[return-value]
