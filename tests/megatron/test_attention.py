"""The actor's fast paths against the code they replace.

* ``attention.SDPAttention`` (fused SDPA core attention of the local spec) equals megatron's
  ``DotProductAttention`` within float rounding, outputs and input gradients, for the causal case
  (GQA and MHA) and an explicit block-diagonal mask (packed rows); with attention dropout while
  training it falls back to megatron's code; ``model.layer_spec`` puts it into every local layer.
* The log-prob backward that uses the logits kept from the forward gives bit-identical log-probs and
  gradients to the one that recomputes them (``SAVED_LOGITS_ELEMENTS = 0``), with and without an
  entropy gradient.
"""

from __future__ import annotations

import pytest
import torch

from megatron_spo.megatron import logprobs
from megatron_spo.megatron.launch import run_distributed

TOL = 1e-6


def _attention_cases():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_spo.megatron.attention import SDPAttention
    from megatron_spo.megatron.packing import block_causal_mask
    from megatron_spo.megatron.parallel import ParallelSizes, initialize_parallel

    initialize_parallel(ParallelSizes(), seed=0)
    out = {}
    s, b, hd = 12, 2, 8
    segments = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12])
    for heads, groups in ((4, 2), (4, 4)):
        cfg = TransformerConfig(num_layers=1, hidden_size=heads * hd, num_attention_heads=heads,
                                num_query_groups=groups, kv_channels=hd, attention_dropout=0.0,
                                use_cpu_initialization=True)
        ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
        fused = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
        g = torch.Generator().manual_seed(heads + groups)
        qkv = [torch.randn(s, b, n, hd, generator=g) for n in (heads, groups, groups)]
        grad = torch.randn(s, b, heads * hd, generator=g)
        for name, mask in (("causal", None), ("packed", block_causal_mask(segments))):
            res = []
            for module in (ref, fused):
                leaves = [t.clone().requires_grad_(True) for t in qkv]
                y = module(*leaves, mask)
                y.backward(grad)
                res.append([y.detach()] + [t.grad for t in leaves])
            out[(heads, groups, name)] = max(float((a - c).abs().max()) for a, c in zip(*res))
    # dropout while training: megatron's own code runs (the fused call would draw other random numbers)
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, kv_channels=8,
                            attention_dropout=0.5, use_cpu_initialization=True)
    fused = SDPAttention(cfg, 1, AttnMaskType.causal, "self").train()
    calls = []
    original = DotProductAttention.forward
    DotProductAttention.forward = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        fused(*[torch.randn(s, 1, 4, 8) for _ in range(3)], None)
    finally:
        DotProductAttention.forward = original
    out["dropout_fallback"] = len(calls)
    return out


def test_sdpa_attention_equals_megatron_attention():
    out = run_distributed(_attention_cases, 1, timeout=300)[0]
    assert out.pop("dropout_fallback") == 1
    for key, diff in out.items():
        assert diff <= TOL, (key, diff)


def _spec_modules():
    from megatron_spo.megatron.attention import SDPAttention
    from megatron_spo.megatron.model import hf_to_transformer_config, layer_spec
    from megatron_spo.megatron.parallel import ParallelSizes, initialize_parallel
    from megatron_spo.models.tiny import tiny_config

    cfg = tiny_config("llama").to_dict()
    initialize_parallel(ParallelSizes(), hf_config=cfg, seed=0)
    config = hf_to_transformer_config(cfg)
    core = [layer.submodules.self_attention.submodules.core_attention
            for layer in layer_spec(config, use_te=False).layer_specs]
    unfused = [layer.submodules.self_attention.submodules.core_attention
               for layer in layer_spec(config, use_te=False, fused_attention=False).layer_specs]
    return [c is SDPAttention for c in core], [c is SDPAttention for c in unfused]


def test_local_spec_uses_sdpa_attention():
    fused, unfused = run_distributed(_spec_modules, 1, timeout=300)[0]
    assert fused and all(fused) and not any(unfused)


@pytest.mark.parametrize("entropy_grad", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kept_logits_backward_is_bit_identical_to_recompute(monkeypatch, entropy_grad, temperature):
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(70, 16, generator=g), torch.randn(90, 16, generator=g)
    targets, g_lp, g_h = torch.randint(0, 90, (70,), generator=g), torch.randn(70, generator=g), torch.randn(70, generator=g)
    res = {}
    for budget in (logprobs.SAVED_LOGITS_ELEMENTS, 40 * 90, 0):  # all kept, the first chunks kept, none
        monkeypatch.setattr(logprobs, "SAVED_LOGITS_ELEMENTS", budget)
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp, ent = logprobs.chunked_logprobs_from_hidden(h, w, targets, temperature=temperature, chunk_tokens=16)
        ((lp * g_lp).sum() + ((ent * g_h).sum() if entropy_grad else 0)).backward()
        res[budget] = (lp.detach(), ent.detach(), h.grad, w.grad)
    for budget in res:
        assert all(torch.equal(a, b) for a, b in zip(res[budget], res[0])), budget
