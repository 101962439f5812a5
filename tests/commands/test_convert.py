"""``convert hf-to-mcore`` under torchrun at EP=2, then ``convert mcore-to-hf`` in one process (EP=1).

The round trip must give back the original HF tensors bit for bit, and the written directory must
load in transformers (weights, config and tokenizer).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_spo.commands import convert
from megatron_spo.convert.hf_io import SafetensorsDirSource
from megatron_spo.models.tiny import make_tiny_model_dir


def _torchrun(nproc: int, args: list, log: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_spo.commands.convert", *args]
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=fh, stderr=subprocess.STDOUT,
                            timeout=600).returncode
    assert rc == 0, f"{' '.join(cmd)} exited {rc}\n{log.read_text()[-6000:]}"


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    hf = make_tiny_model_dir(tmp / "hf", "qwen3_moe")
    ckpt, out = tmp / "mcore", tmp / "hf_out"
    _torchrun(2, ["hf-to-mcore", "--hf", str(hf), "--out", str(ckpt), "--ep", "2"], tmp / "h2m.log")
    _torchrun(1, ["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out), "--max-shard-gb", str(200 / 2**20)],
              tmp / "m2h.log")
    return hf, ckpt, out, (tmp / "h2m.log").read_text(), (tmp / "m2h.log").read_text()


def test_hf_to_mcore_writes_a_published_checkpoint(roundtrip):
    _, ckpt, _, log, _ = roundtrip
    assert (ckpt / "latest").read_text().strip() == "step_00000000"
    step = ckpt / "step_00000000"
    assert (step / "COMPLETE.json").is_file() and (step / "hf" / "config.json").is_file()
    assert (step / "hf" / "tokenizer.json").is_file()
    assert "load HF" in log and "100%" in log  # the progress bar ran to the end


def test_mcore_to_hf_is_bit_identical_and_loads_in_transformers(roundtrip):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, _, out, _, log = roundtrip
    src, got = SafetensorsDirSource(hf), SafetensorsDirSource(out)
    assert sorted(src.keys()) == sorted(got.keys())
    for name in src.keys():
        assert torch.equal(src.get(name), got.get(name)), name
    assert (out / "model.safetensors.index.json").is_file()  # 200 KiB shards -> several files
    assert "export HF" in log
    ids = torch.randint(0, 500, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    assert torch.equal(a, b)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")


def test_register_adds_both_directions():
    parser = argparse.ArgumentParser()
    convert.register(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["convert", "hf-to-mcore", "--hf", "x", "--out", "y", "--tp", "2", "--pp", "2"])
    assert a.func is convert.hf_to_mcore and (a.tp, a.pp, a.ep) == (2, 2, 1)
    b = parser.parse_args(["convert", "mcore-to-hf", "--ckpt", "c", "--out", "o", "--dtype", "bf16"])
    assert b.func is convert.mcore_to_hf and b.dtype == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "sideways"])
