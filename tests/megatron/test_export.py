"""HF -> Megatron load and the streaming Megatron -> HF export, against transformers' forward.

Two spawns in total (each process imports megatron, ~10 s): one process runs every family at TP=1,
two processes run TP=2 (Qwen3, Llama), EP=2 (Qwen3-MoE) and PP=2 (Llama with tied embeddings,
Qwen3-MoE) layouts. Reference logits come from transformers in this (unshimmed) test process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_spo.convert.hf_io import SafetensorsDirSource
from megatron_spo.megatron.launch import run_distributed
from megatron_spo.models.tiny import make_tiny_model_dir

FAMILIES = ("qwen3", "qwen3_moe", "llama")
BUCKET = 64 << 10  # small, so the tiny models span many buckets


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def _megatron_logits(chunks, vocab: int) -> torch.Tensor:
    """Full-vocabulary logits [B, T, V] of the (single-stage) model, gathered over TP."""
    from megatron_spo.megatron.logprobs import full_vocab_logits

    return full_vocab_logits(chunks[0], _ids(vocab), vocab)


def _export(chunks, cfg):
    from megatron_spo.megatron.export import export_hf_weights

    out, sizes = {}, []
    for bucket in export_hf_weights(chunks, cfg, bucket_bytes=BUCKET):
        sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
        for name, t in bucket:
            assert name not in out, name
            out[name] = t.clone()
    return out, sizes


def _run_layout(hf_dir: str, sizes_kw: dict, logits: bool, source=None):
    from megatron_spo.megatron.export import load_hf_weights
    from megatron_spo.megatron.model import build_model
    from megatron_spo.megatron.parallel import ParallelSizes, initialize_parallel

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    initialize_parallel(ParallelSizes(**sizes_kw), hf_config=cfg)
    chunks = build_model(cfg)
    n = load_hf_weights(chunks, hf_dir if source is None else source)
    res = {"loaded": n}
    if logits:
        res["logits"] = _megatron_logits(chunks, cfg["vocab_size"])
    res["export"], res["bucket_sizes"] = _export(chunks, cfg)
    return res


def _worker_single(dirs: dict, out_root: str):
    """TP=1, every family; also writes the export as a HF checkpoint through SafetensorsWriter."""
    from megatron_spo.convert.hf_io import SafetensorsWriter, copy_hf_metadata

    results = {}
    for fam, d in dirs.items():
        res = _run_layout(d, {}, logits=True)
        out = Path(out_root) / fam
        writer = SafetensorsWriter(out, max_shard_bytes=256 << 10)  # forces a sharded checkpoint + index
        for name, t in res["export"].items():
            writer.add(name, t)
        res["files"] = writer.close()
        copy_hf_metadata(d, out)
        res["out"] = str(out)
        results[fam] = res
    # "Load from an HF model at train start": an in-memory transformers model (fused MoE experts).
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(dirs["qwen3_moe"], dtype=torch.float32)
    results["qwen3_moe-in-memory"] = _run_layout(dirs["qwen3_moe"], {}, logits=True, source=hf_model)
    return results


def _worker_pair(dirs: dict):
    import torch.distributed as dist

    layouts = [("qwen3", {"tp": 2}, True), ("llama", {"tp": 2}, True), ("qwen3_moe", {"ep": 2}, True),
               ("llama", {"pp": 2}, False), ("qwen3_moe", {"pp": 2}, False)]
    results = {}
    for fam, kw, logits in layouts:
        res = _run_layout(dirs[fam], kw, logits)
        key = f"{fam}-" + ",".join(f"{k}{v}" for k, v in kw.items())
        results[key] = res if dist.get_rank() == 0 else {"logits": res.get("logits"), "loaded": res["loaded"],
                                                          "n_export": len(res["export"])}
    return results


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: str(make_tiny_model_dir(root / f, f)) for f in FAMILIES}


@pytest.fixture(scope="module")
def hf_logits(tiny_dirs):
    from transformers import AutoModelForCausalLM

    out = {}
    for fam, d in tiny_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            out[fam] = model(_ids(model.config.vocab_size)).logits
    return out


@pytest.fixture(scope="module")
def single(tiny_dirs, tmp_path_factory):
    (res,) = run_distributed(_worker_single, 1, args=(tiny_dirs, str(tmp_path_factory.mktemp("out"))), timeout=600)
    return res


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    return run_distributed(_worker_pair, 2, args=(tiny_dirs,), timeout=600)


def _assert_bit_identical(exported: dict, hf_dir: str):
    src = SafetensorsDirSource(hf_dir)
    assert sorted(exported) == sorted(src.keys())
    for name, t in exported.items():
        ref = src.get(name)
        assert t.dtype == ref.dtype and t.shape == ref.shape, name
        assert torch.equal(t, ref), name


@pytest.mark.parametrize("family", FAMILIES)
def test_tp1_logits_match_transformers(single, hf_logits, family):
    diff = (single[family]["logits"] - hf_logits[family]).abs().max().item()
    print(f"{family} TP=1 max |logits diff| {diff:.3g}")
    assert diff <= 1e-4, f"{family}: max |logits diff| {diff}"


def test_load_from_in_memory_transformers_model(single, hf_logits, tiny_dirs):
    res = single["qwen3_moe-in-memory"]
    diff = (res["logits"] - hf_logits["qwen3_moe"]).abs().max().item()
    assert diff <= 1e-4, diff
    _assert_bit_identical(res["export"], tiny_dirs["qwen3_moe"])


@pytest.mark.parametrize("family", FAMILIES)
def test_tp1_export_is_bit_identical_and_bucketed(single, tiny_dirs, family):
    res = single[family]
    _assert_bit_identical(res["export"], tiny_dirs[family])
    sizes = res["bucket_sizes"]
    assert len(sizes) > 1
    # every bucket respects the budget unless it holds one oversized tensor (the embedding, 130 KB)
    biggest = max(t.numel() * t.element_size() for t in res["export"].values())
    assert all(s <= max(BUCKET, biggest) for s in sizes)
    assert sum(sizes) == sum(t.numel() * t.element_size() for t in res["export"].values())


@pytest.mark.parametrize("family", FAMILIES)
def test_written_checkpoint_loads_in_transformers(single, tiny_dirs, hf_logits, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = single[family]["out"]
    assert len(single[family]["files"]) > 1 and Path(out, "model.safetensors.index.json").is_file()
    _assert_bit_identical({k: SafetensorsDirSource(out).get(k) for k in SafetensorsDirSource(out).keys()},
                          tiny_dirs[family])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(_ids(model.config.vocab_size)).logits
    assert torch.equal(logits, hf_logits[family])
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("What is 3 + 4?")["input_ids"]) == "What is 3 + 4?"


@pytest.mark.parametrize("key,family", [("qwen3-tp2", "qwen3"), ("llama-tp2", "llama"), ("qwen3_moe-ep2", "qwen3_moe")])
def test_tp2_ep2_logits_match_transformers(pair, hf_logits, key, family):
    for rank in (0, 1):
        diff = (pair[rank][key]["logits"] - hf_logits[family]).abs().max().item()
        print(f"{key} rank {rank} max |logits diff| {diff:.3g}")
        assert diff <= 1e-4, f"{key} rank {rank}: max |logits diff| {diff}"


@pytest.mark.parametrize("key,family", [("qwen3-tp2", "qwen3"), ("llama-tp2", "llama"), ("qwen3_moe-ep2", "qwen3_moe"),
                                        ("llama-pp2", "llama"), ("qwen3_moe-pp2", "qwen3_moe")])
def test_parallel_export_gathers_everything_bit_identical(pair, tiny_dirs, key, family):
    _assert_bit_identical(pair[0][key]["export"], tiny_dirs[family])
    # every rank received the same full set, and loaded only its own shard's parameters
    assert pair[1][key]["n_export"] == len(pair[0][key]["export"])
    if key == "qwen3_moe-ep2":  # 4 experts over 2 ranks: each rank holds 2 experts x 2 layers x fc1/fc2
        assert pair[0][key]["loaded"] == pair[1][key]["loaded"] == 33 - 8
    # PP=2 over 2 layers: stage 0 = embedding + layer 0, stage 1 = layer 1 + final norm + output layer
    # (Llama: the tied output-layer copy, loaded from embed_tokens); Qwen3-MoE layers have 15 params.
    expected = {"llama-pp2": (1 + 6, 6 + 2), "qwen3_moe-pp2": (1 + 15, 15 + 2)}.get(key)
    if expected:
        assert (pair[0][key]["loaded"], pair[1][key]["loaded"]) == expected
