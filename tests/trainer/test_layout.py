"""Impossible parallel layouts are refused against the model's config.json before anything is built.

Each bad layout gets one line naming the ``parallel.*`` key and the model field; every layout the
parallel tests really run (tests/megatron/test_actor_parallel.py) still passes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_spo.config import ConfigError, load_config
from megatron_spo.models.tiny import tiny_config
from megatron_spo.trainer.layout import LayoutError, check_layout, model_problems, read_model_config

ROOT = Path(__file__).resolve().parents[2]


def _model(tmp_path: Path, family: str = "qwen3", **fields) -> str:
    """A tiny model dir holding only its config.json (the layout check reads nothing else)."""
    path = tmp_path / f"{family}_model"
    tiny_config(family, **fields).save_pretrained(path)
    return str(path)


def _check(tmp_path, family="qwen3", fields=None, parallel=(), world=1, cuda=False):
    cfg = load_config(overrides=[f"model.path={_model(tmp_path, family, **(fields or {}))}",
                                 *(f"parallel.{k}" for k in parallel)])
    check_layout(cfg, cuda_available=cuda, world_size=world)


BAD = [
    # (family, model fields, parallel overrides, world size, the message part)
    ("qwen3", {"num_key_value_heads": 4}, ["tensor=3"], 3,
     "parallel.tensor=3 does not divide the model's num_attention_heads=4 ("),
    ("qwen3", {}, ["tensor=4"], 4,
     "parallel.tensor=4 does not divide the model's num_key_value_heads=2 ("),
    ("qwen3", {"vocab_size": 511}, ["tensor=2"], 2, "parallel.tensor=2 does not divide the model's vocab_size=511"),
    ("llama", {"intermediate_size": 129}, ["tensor=2"], 2,
     "parallel.tensor=2 does not divide the model's intermediate_size=129"),
    ("qwen3_moe", {"moe_intermediate_size": 33}, ["tensor=2", "expert_tensor=2"], 2,
     "parallel.expert_tensor=2 does not divide the model's moe_intermediate_size=33"),
    ("qwen3_moe", {"moe_intermediate_size": 33}, ["tensor=2"], 2,
     "parallel.tensor=2 (parallel.expert_tensor is null) does not divide the model's moe_intermediate_size=33"),
    ("qwen3", {"num_hidden_layers": 2}, ["pipeline=3"], 3,
     "parallel.pipeline=3 does not divide the model's num_hidden_layers=2"),
    ("qwen3", {"num_hidden_layers": 6}, ["pipeline=2", "virtual_pipeline=2"], 2,
     "parallel.pipeline=2 x parallel.virtual_pipeline=2 = 4 does not divide the model's num_hidden_layers=6"),
    ("qwen3_moe", {}, ["expert=3", "expert_tensor=1"], 3,
     "parallel.expert=3 does not divide the model's num_local_experts=4"),
    ("qwen3", {}, ["expert=2", "expert_tensor=1"], 2, "parallel.expert=2 > 1 but the model has no experts"),
    ("qwen3", {}, ["tensor=2"], 3,
     "world size 3 is not divisible by TP*PP*CP = 2 (parallel.tensor=2 x parallel.pipeline=1 x parallel.context=1)"),
    ("qwen3_moe", {}, ["expert=4", "expert_tensor=1"], 2,
     "world size 2 is not divisible by ETP*EP*PP = 4 (parallel.expert_tensor=1 x parallel.expert=4 x "
     "parallel.pipeline=1)"),
    ("qwen3", {}, ["tensor=2", "expert_tensor=4"], 2, "world size 2 is not divisible by ETP*EP*PP = 4"),
    ("qwen3", {}, ["tensor=2", "sequence_parallel=true"], 2, "parallel.sequence_parallel=true needs CUDA"),
    ("qwen3", {}, ["context=2"], 2, "parallel.context=2 needs CUDA"),
    ("qwen3", {}, ["distributed_optimizer=true"], 1, "parallel.distributed_optimizer=true needs CUDA"),
]


@pytest.mark.parametrize("family, fields, parallel, world, message", BAD, ids=[b[-1][:48] for b in BAD])
def test_bad_layout_is_one_line_naming_key_and_field(tmp_path, family, fields, parallel, world, message):
    with pytest.raises(LayoutError) as info:
        _check(tmp_path, family, fields, parallel, world)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert isinstance(info.value, ConfigError)  # reported like every config error
    if "model's" in message:
        assert f"{family}_model/config.json)" in text


GOOD = [
    # the layouts tests/megatron/test_actor_parallel.py runs on 2 processes, and the 1-process reference
    ("qwen3", {}, [], 1), ("qwen3", {}, ["tensor=2"], 2), ("qwen3", {}, ["pipeline=2"], 2), ("qwen3", {}, [], 2),
    ("llama", {}, ["pipeline=2"], 2), ("qwen3_moe", {}, ["expert=2", "expert_tensor=1"], 2),
    ("qwen3_moe", {}, ["pipeline=2"], 2),
    ("qwen3", {"num_hidden_layers": 4}, ["pipeline=2", "virtual_pipeline=2"], 2),
    # TP 2 on 2 KV heads; the 30B-A3B recipe's layout on 8 ranks; the experts' own TP
    ("qwen3", {}, ["tensor=2"], 4),
    ("qwen3_moe", {"num_experts": 8}, ["tensor=2", "expert=8", "expert_tensor=1", "sequence_parallel=true",
                                       "distributed_optimizer=true"], 8),
    ("qwen3_moe", {"moe_intermediate_size": 32}, ["tensor=2", "expert_tensor=2"], 4),
    # an all-MoE model builds no dense MLP, so its intermediate_size need not divide by TP
    ("qwen3_moe", {"intermediate_size": 129}, ["tensor=2"], 2),
]


@pytest.mark.parametrize("family, fields, parallel, world", GOOD)
def test_layouts_that_run_pass(tmp_path, family, fields, parallel, world):
    _check(tmp_path, family, fields, parallel, world, cuda=any("sequence_parallel" in p for p in parallel))


def test_every_problem_is_listed_on_the_one_line(tmp_path):
    with pytest.raises(LayoutError) as info:
        _check(tmp_path, "qwen3", {}, ["tensor=3"], 4)
    parts = str(info.value).split("; ")
    assert parts[0].startswith("world size 4 is not divisible by TP*PP*CP = 3")
    for field in ("num_attention_heads=4", "num_key_value_heads=2", "vocab_size=512", "intermediate_size=128"):
        assert any(f"parallel.tensor=3 does not divide the model's {field}" in p for p in parts), field


def test_moe_with_a_dense_layer_needs_intermediate_size_to_divide(tmp_path):
    fields = {"intermediate_size": 129, "mlp_only_layers": [0]}
    with pytest.raises(LayoutError, match="intermediate_size=129"):
        _check(tmp_path, "qwen3_moe", fields, ["tensor=2"], 2)


def test_world_size_defaults_to_the_launcher_variable(tmp_path, monkeypatch):
    cfg = load_config(overrides=[f"model.path={_model(tmp_path)}", "parallel.tensor=2"])
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(LayoutError, match="world size 3"):
        check_layout(cfg, cuda_available=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_layout(cfg, cuda_available=False)


def test_missing_or_unreadable_model_config(tmp_path):
    with pytest.raises(LayoutError, match=r"model.path=.*nothing does not exist"):
        read_model_config(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match=r"model.path=.*empty has no HF config.json"):
        read_model_config(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(LayoutError, match="cannot read .*broken/config.json"):
        read_model_config(str(tmp_path / "broken"))
    with pytest.raises(LayoutError, match="model.path is not set"):
        read_model_config("")


def test_model_problems_read_plain_dicts():
    """No KV-heads field means multi-head attention; absent fields are left to the model builder."""
    layout = load_config(overrides=["parallel.tensor=2"]).parallel
    assert model_problems(layout, {"num_attention_heads": 4, "num_hidden_layers": 2}, "x") == []
    assert model_problems(layout, {"num_attention_heads": 3}, "x") == [
        "parallel.tensor=2 does not divide the model's num_attention_heads=3 (x)",
        "parallel.tensor=2 does not divide the model's num_key_value_heads=3 (x); every tensor-parallel rank "
        "needs whole KV heads"]


def test_trainer_refuses_before_torch_distributed(tmp_path):
    """build_actor checks the layout before torch.distributed and megatron's parallel state exist."""
    import torch.distributed as dist

    from megatron_spo.trainer.setup import build_actor

    cfg = load_config(overrides=[f"model.path={_model(tmp_path)}", "data.train_path=unused.jsonl",
                                 "parallel.tensor=3"])
    with pytest.raises(LayoutError, match="parallel.tensor=3 does not divide the model's num_attention_heads=4"):
        build_actor(cfg)
    assert not dist.is_initialized()


def test_train_command_prints_one_line_and_exits_2(tmp_path):
    """`python -m megatron_spo.train` (what torchrun starts) with a bad layout: one `error:` line, no traceback."""
    from megatron_spo.models.tiny import make_tiny_tokenizer

    model = _model(tmp_path)
    make_tiny_tokenizer().save_pretrained(model)  # the data check before the actor tokenizes the prompts
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n" for a in range(4)))
    args = [sys.executable, "-m", "megatron_spo.train", "--set", f"model.path={model}",
            "--set", f"data.train_path={data}", "--set", "parallel.pipeline=3",
            "--set", f"io.run_dir={tmp_path / 'run'}"]
    # As rank 0 of 3 under torchrun: the world fits PP 3, the model's 2 layers do not.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WORLD_SIZE="3", RANK="0")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: parallel.pipeline=3 does not divide the model's num_hidden_layers=2 "
                      f"({tmp_path / 'qwen3_model' / 'config.json'})"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
