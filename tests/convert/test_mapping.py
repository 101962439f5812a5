"""The pure HF <-> Megatron mapping: names, value layouts, TP split/merge (no megatron import)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_spo.convert import mapping, sharding
from megatron_spo.convert.hf_io import SafetensorsDirSource
from megatron_spo.models.tiny import make_tiny_model_dir, tiny_config

FAMILIES = ("qwen3", "qwen3_moe", "llama")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model_dir(root / f, f, tokenizer=False) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_entries_cover_exactly_the_hf_checkpoint(tiny_dirs, family):
    src = SafetensorsDirSource(tiny_dirs[family])
    dims = mapping.dims_from_hf_config(tiny_config(family))
    hf_names = [n for e in mapping.entries(dims) for n in e.hf]
    assert len(hf_names) == len(set(hf_names))
    assert sorted(hf_names) == sorted(src.keys())
    mcore = [e.mcore for e in mapping.entries(dims)]
    assert len(mcore) == len(set(mcore))
    if family == "qwen3_moe":
        assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight" in mcore
        assert "decoder.layers.1.mlp.router.weight" in mcore
    if family == "llama":  # tied: no lm_head, and no q/k norms
        assert "output_layer.weight" not in mcore
        assert not any("q_layernorm" in n for n in mcore)
        tied = mapping.entry_index(dims)["output_layer.weight"]
        assert tied.hf == ("model.embed_tokens.weight",)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [0, 8])
def test_hf_mcore_hf_roundtrip_is_bit_identical(tiny_dirs, family, padded):
    src = SafetensorsDirSource(tiny_dirs[family])
    dims = mapping.dims_from_hf_config(json.loads((tiny_dirs[family] / "config.json").read_text()))
    dims = dims.with_padded_vocab(dims.vocab_size + padded)
    for e in mapping.entries(dims):
        hf = [src.get(n) for n in e.hf]
        full = mapping.hf_to_mcore(e, hf, dims)
        if e.conv == mapping.VOCAB:
            assert full.shape[0] == dims.padded_vocab_size
            assert torch.count_nonzero(full[dims.vocab_size:]) == 0
        back = mapping.mcore_to_hf(e, full, dims)
        assert [n for n, _ in back] == list(e.hf)
        for (_, t), ref in zip(back, hf):
            assert t.dtype == ref.dtype and torch.equal(t, ref)


def test_qkv_layout_is_interleaved_per_query_group():
    # 6 query heads, 2 groups, head dim 2: each row holds (kind, head, row-in-head) so the layout
    # can be read off; the expected order is written out by hand from megatron's attention code
    # ("q1 q2 k1 v1 | q3 q4 k2 v2"): per group, its 3 query heads, then its k head, then its v head.
    dims = mapping.ModelDims("qwen3", 1, 4, num_heads=6, num_kv_heads=2, head_dim=2, ffn_hidden_size=8,
                             vocab_size=10, tied=False, qk_norm=True)
    e = mapping.entry_index(dims)["decoder.layers.0.self_attention.linear_qkv.weight"]

    def rows(kind, heads):
        return torch.tensor([[kind, h, r, 0] for h in range(heads) for r in range(2)], dtype=torch.float32)

    q, k, v = rows(0, 6), rows(1, 2), rows(2, 2)
    full = mapping.hf_to_mcore(e, [q, k, v], dims)
    expected = []
    for g in range(2):
        expected += [(0, h, r) for h in (3 * g, 3 * g + 1, 3 * g + 2) for r in range(2)]
        expected += [(1, g, r) for r in range(2)] + [(2, g, r) for r in range(2)]
    np.testing.assert_array_equal(full[:, :3].numpy(), np.array(expected, dtype=np.float32))


def test_gate_up_is_gate_then_up_and_glu_tp_split_interleaves():
    dims = mapping.dims_from_hf_config(tiny_config("qwen3"))
    e = mapping.entry_index(dims)["decoder.layers.0.mlp.linear_fc1.weight"]
    gate = torch.arange(4.0).reshape(4, 1)
    up = 10 + torch.arange(4.0).reshape(4, 1)
    full = mapping.hf_to_mcore(e, [gate, up], dims)
    assert full.flatten().tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    # TP=2: MLP.forward chunks each rank's fc1 output into (gate, up), so rank r needs both halves.
    assert sharding.shard(full, e.split, 0, 2).flatten().tolist() == [0, 1, 10, 11]
    assert sharding.shard(full, e.split, 1, 2).flatten().tolist() == [2, 3, 12, 13]


@pytest.mark.parametrize("split", [mapping.REPLICATED, mapping.COLUMN, mapping.ROW, mapping.GLU_COLUMN])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_unshard_roundtrip(split, tp):
    full = torch.randn(16, 8)
    parts = [sharding.shard(full, split, r, tp) for r in range(tp)]
    for p in parts:
        assert tuple(p.shape) == (tuple(full.shape) if split == mapping.REPLICATED else
                                  {mapping.ROW: (16, 8 // tp)}.get(split, (16 // tp, 8)))
        assert sharding.full_shape(p.shape, split, tp) == tuple(full.shape)
    assert torch.equal(sharding.unshard(parts, split), full)
    if split == mapping.COLUMN:
        assert torch.equal(parts[-1], full[16 - 16 // tp:])
    if split == mapping.ROW:
        assert torch.equal(parts[0], full[:, : 8 // tp])


def test_shard_errors_name_the_tensor():
    with pytest.raises(ValueError, match="linear_qkv.*not divisible by tensor-parallel size 3"):
        sharding.shard(torch.zeros(8, 4), mapping.COLUMN, 0, 3, name="decoder.layers.0.linear_qkv.weight")
    with pytest.raises(ValueError, match="unknown TP split"):
        sharding.shard(torch.zeros(8, 4), "diagonal", 0, 2)


def test_globalize_name_pp_and_ep_offsets():
    g = mapping.globalize_name
    assert g("decoder.layers.0.mlp.linear_fc1.weight", layer_offset=12) == "decoder.layers.12.mlp.linear_fc1.weight"
    # EP rank 1 of 2 with 4 experts: local expert j is global expert 2 + j.
    assert (g("module.module.decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight", 2, expert_offset=2)
            == "decoder.layers.3.mlp.experts.local_experts.3.linear_fc2.weight")
    assert g("embedding.word_embeddings.weight", 5, 5) == "embedding.word_embeddings.weight"
    # Transformer Engine spec names land on the local-spec names.
    assert g("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight") == "decoder.layers.0.input_layernorm.weight"
    assert g("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == "decoder.layers.0.pre_mlp_layernorm.weight"
    assert (g("decoder.layers.0.mlp.experts.linear_fc1.weight3", 0, expert_offset=4)
            == "decoder.layers.0.mlp.experts.local_experts.7.linear_fc1.weight")
    assert mapping.local_layer_index("module.decoder.layers.7.input_layernorm.weight") == 7
    assert mapping.local_layer_index("output_layer.weight") is None


def test_moe_layer_selection_follows_transformers():
    cfg = tiny_config("qwen3_moe", num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=1)
    dims = mapping.dims_from_hf_config(cfg)
    assert dims.moe_layers == (1, 2, 3)
    names = [e.mcore for e in mapping.entries(dims)]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names
    assert "decoder.layers.0.mlp.router.weight" not in names
    dims2 = mapping.dims_from_hf_config(tiny_config("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2))
    assert dims2.moe_layers == (1, 3)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        mapping.dims_from_hf_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="attention_bias=True"):
        mapping.dims_from_hf_config(tiny_config("llama", attention_bias=True))
    dims = mapping.dims_from_hf_config(tiny_config("qwen3"))
    e = mapping.entry_index(dims)["decoder.layers.0.self_attention.linear_qkv.weight"]
    with pytest.raises(ValueError, match="k_proj.weight: 16 rows, expected 32"):
        mapping.hf_to_mcore(e, [torch.zeros(64, 64), torch.zeros(16, 64), torch.zeros(32, 64)], dims)
