"""Core attention for the local (non-Transformer-Engine) layer spec: torch's fused SDPA.

megatron's local ``DotProductAttention`` builds the full ``[b, heads, sq, sk]`` score tensor with
``baddbmm``, masks it with ``masked_fill_(-10000)``, runs a separate softmax and a second ``bmm``, and
repeats the KV heads of grouped-query attention into real copies first. On CPU that costs ~1.8x
``torch.nn.functional.scaled_dot_product_attention``, which fuses the three steps (flash-style,
no score tensor kept for backward) and reads the KV groups without copying (``enable_gqa``).

``SDPAttention`` is a drop-in subclass (same constructor, same ``[sq, b, heads, d]`` inputs and
``[sq, b, heads * d]`` output, same softmax scale) that ``model.layer_spec`` puts into the local spec.
Masks: megatron's convention is a bool ``attention_mask`` with True = masked (e.g. the block-diagonal
causal mask of packed rows, ``packing.block_causal_mask`` ``[R, 1, W, W]``); SDPA's bool mask is
True = attend, so it gets ``~attention_mask``. Without a mask a causal layer uses ``is_causal``.
Results equal the unfused path up to float rounding (masked scores are -inf instead of -10000, and
the reductions run in another order).

Configurations the fused call does not reproduce exactly fall back to megatron's implementation:
attention dropout while training, a softmax offset, sliding windows, query-key layer scaling,
non-fp32 inputs, packed-sequence params (THD is for TE) and attention biases.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """megatron's ``DotProductAttention`` computed by ``F.scaled_dot_product_attention`` (module docstring)."""

    def _fused_ok(self, query: torch.Tensor, attention_bias, packed_seq_params) -> bool:
        dropout = self.training and self.attention_dropout.p > 0
        return not (dropout or attention_bias is not None or packed_seq_params is not None
                    or self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None
                    or self.config.apply_query_key_layer_scaling or query.dtype != torch.float32)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn], attention_mask bool (True = masked) or None
        -> context [sq, b, np * hn]."""
        if not self._fused_ok(query, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        sq, b, heads, _ = query.shape
        causal = (attention_mask is None and self.attn_mask_type == AttnMaskType.causal and sq > 1)
        mask = None if attention_mask is None else attention_mask.logical_not()
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn] views
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 scale=self.softmax_scale, enable_gqa=key.shape[2] != heads)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
