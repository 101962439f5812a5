"""HF tensor sources (lazy safetensors, in-memory fused experts), the sharded writer, and bucketing."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_spo.convert import hf_io
from megatron_spo.models.tiny import make_tiny_model_dir


def test_in_memory_fused_experts_serve_per_expert_names(tmp_path):
    from transformers import AutoModelForCausalLM

    d = make_tiny_model_dir(tmp_path / "moe", "qwen3_moe", tokenizer=False)
    disk = hf_io.SafetensorsDirSource(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    mem = hf_io.open_source(model)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in mem.keys())  # transformers 5 fuses experts
    for name in disk.keys():
        assert name in mem
        assert torch.equal(mem.get(name), disk.get(name)), name
    with pytest.raises(KeyError, match="model.layers.0.mlp.experts.9.up_proj.weight"):
        disk.get("model.layers.0.mlp.experts.9.up_proj.weight")


def test_writer_shards_index_and_roundtrip(tmp_path):
    tensors = {f"t{i}": torch.randn(64, 64) for i in range(5)}  # 16 KiB each
    w = hf_io.SafetensorsWriter(tmp_path / "out", max_shard_bytes=40 << 10)
    w.add_many(tensors.items())
    files = w.close()
    assert files == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    src = hf_io.SafetensorsDirSource(tmp_path / "out")
    assert sorted(src.keys()) == sorted(tensors)
    assert all(torch.equal(src.get(k), v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="duplicate tensor name 't0'"):
        w2 = hf_io.SafetensorsWriter(tmp_path / "dup")
        w2.add("t0", tensors["t0"])
        w2.add("t0", tensors["t0"])


def test_single_shard_is_model_safetensors(tmp_path):
    w = hf_io.SafetensorsWriter(tmp_path)
    base = torch.arange(12.0).reshape(3, 4)
    w.add("a", base[:, 1:3])  # a strided view is written as its own contiguous copy
    assert w.close() == ["model.safetensors"]
    assert torch.equal(hf_io.SafetensorsDirSource(tmp_path).get("a"), base[:, 1:3])


def test_bucketize_respects_budget_and_order():
    pairs = [(f"x{i}", torch.zeros(n, dtype=torch.uint8)) for i, n in enumerate([30, 30, 50, 200, 10, 10])]
    buckets = list(hf_io.bucketize(pairs, 64))
    assert [[n for n, _ in b] for b in buckets] == [["x0", "x1"], ["x2"], ["x3"], ["x4", "x5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in pairs]
    with pytest.raises(ValueError, match="budget must be > 0"):
        list(hf_io.bucketize(pairs, 0))


def test_copy_metadata_skips_weights(tmp_path):
    d = make_tiny_model_dir(tmp_path / "src", "llama")
    copied = hf_io.copy_hf_metadata(d, tmp_path / "dst")
    assert "config.json" in copied and "tokenizer.json" in copied
    assert not any(n.endswith(".safetensors") for n in copied)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_io.copy_hf_metadata(tmp_path / "dst" / "..", tmp_path / "x")
