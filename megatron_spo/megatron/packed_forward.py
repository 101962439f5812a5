"""The model forward and the token log-probs of a packed micro-batch (layout: ``packing.py``).

Local spec (CPU): megatron's ``DotProductAttention`` takes an explicit ``attention_mask``
([R, 1, W, W] bool, True = masked), so the block-diagonal causal mask of ``packing.block_causal_mask``
keeps every sequence to itself. ``GPTModel`` computes RoPE from the sequence length alone (positions
0..W-1 for every row; ``position_ids`` only feed learned absolute embeddings), so ``packed_rotary``
swaps the rotary module's forward, on this instance and only for the call, for one that returns the
angles of each token's own position, ``[W, R, 1, dim]`` — the same products ``position * inv_freq``
the padded path computes, so every token is rotated exactly as there.

Transformer Engine (GPU): the THD layout, ``PackedSeqParams(qkv_format="thd", cu_seqlens)``;
megatron's attention then applies RoPE per sequence and TE's varlen kernels mask across sequences.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Tuple

import torch

from megatron_spo.megatron.logprobs import chunked_logprobs_from_hidden, output_weight
from megatron_spo.megatron.packing import block_causal_mask


@contextlib.contextmanager
def packed_rotary(model: torch.nn.Module, position_ids: torch.Tensor) -> Iterator[None]:
    """Make ``model.rotary_pos_emb`` return per-token angles for ``position_ids`` [R, W] (see module docstring)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        yield
        return

    def forward(max_seq_len=None, offset=0, packed_seq=False, cp_group=None):
        inv_freq = rope.inv_freq.to(position_ids.device)
        seq = position_ids.t().to(inv_freq.dtype)  # [W, R]
        if rope.seq_len_interpolation_factor is not None:
            seq = seq * (1 / rope.seq_len_interpolation_factor)
        freqs = seq.unsqueeze(-1) * inv_freq  # [W, R, dim/2]
        if rope.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb.unsqueeze(2)  # [W, R, 1, dim]: broadcasts over heads in the bshd rotation

    rope.forward = forward
    try:
        yield
    finally:
        del rope.forward


def thd_params(cu_seqlens: torch.Tensor):
    """``PackedSeqParams`` of one THD row from its segment boundaries ``cu_seqlens`` [n + 1] int32."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    # no padding inside segments (a row's tail is a segment of its own): padded bounds = bounds
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest)


def packed_forward(model: torch.nn.Module, gpt: torch.nn.Module, mb: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Run ``model`` (possibly DDP-wrapped ``gpt``) on a packed micro-batch; returns its output.

    THD (``cu_seqlens`` present): input ``[1, T]`` with ``PackedSeqParams``. Otherwise ``[R, W]`` with
    the block-diagonal causal mask and per-token RoPE.
    """
    if "cu_seqlens" in mb:
        return model(mb["packed_ids"], mb["packed_pos"], None, packed_seq_params=thd_params(mb["cu_seqlens"]))
    with packed_rotary(gpt, mb["packed_pos"]):
        return model(mb["packed_ids"], mb["packed_pos"], block_causal_mask(mb["packed_seg"]))


def _place(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Values of the ``valid`` [b, w-1] positions (row-major) -> [b, w], zeros elsewhere and at position 0."""
    body = values.new_zeros(valid.shape).masked_scatter(valid, values)
    return torch.cat([values.new_zeros(valid.shape[0], 1), body], 1)


def packed_token_logprobs(model: torch.nn.Module, hidden: torch.Tensor, mb: Dict[str, torch.Tensor],
                          temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """[R, W, H] packed final hidden states -> (logp [b, w], entropy [b, w]) per sequence of ``mb``.

    Token t of a sequence is predicted by the hidden state of its token t - 1; only real tokens
    (1 <= t < length) are projected. Position 0 and positions past a sequence's length are 0.
    """
    ids = mb["input_ids"]
    steps = torch.arange(1, ids.shape[1], device=ids.device)
    valid = steps.unsqueeze(0) < mb["lengths"].unsqueeze(1)  # [b, w-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    src = mb["packed_src"][:, :-1][valid]
    logp, ent = chunked_logprobs_from_hidden(flat[src], output_weight(model), ids[:, 1:][valid],
                                             temperature=temperature)
    return _place(logp, valid), _place(ent, valid)
