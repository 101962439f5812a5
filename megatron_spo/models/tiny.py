"""Tiny random HF models and a small BPE tokenizer, built from configs at run time.

Tests and the CPU demo use these instead of downloaded checkpoints. Everything is deterministic:
the tokenizer is trained on a fixed synthetic corpus and the weights come from ``torch.manual_seed``.
The chat template follows the Qwen (ChatML) layout, with the tags the SPO tool protocol uses as
single tokens, so multi-turn token accounting is exercised exactly as with a real Qwen tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Union

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Protocol tags that real Qwen3 tokenizers also treat as single tokens (added, not special).
TAG_TOKENS = ["<think>", "</think>", "<code>", "</code>", "<interpreter>", "</interpreter>",
              "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# ChatML, as Qwen renders it: one `<|im_start|>role\n...<|im_end|>\n` block per message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _corpus() -> list:
    """A fixed synthetic corpus: arithmetic, the SPO tool protocol and plain English glue."""
    lines = []
    words = ("the answer is what compute solve step by step first then sum product of and plus minus times "
             "print result python code output final boxed user assistant system question problem number "
             "let us we get so therefore check value equals").split()
    for a in range(0, 100, 3):
        for b in range(0, 100, 7):
            lines.append(f"What is {a} + {b}? The answer is \\boxed{{{a + b}}}.")
            lines.append(f"<code>\n```python\nprint({a} * {b})\n```\n</code><interpreter>\n{a * b}\n</interpreter>")
    lines.append(" ".join(words) * 4)
    return lines


def make_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML specials and a chat template.

    Args:
        vocab_size: BPE vocabulary size including the special and tag tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.add_tokens(TAG_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str = "qwen3", vocab_size: int = 512, **overrides):
    """A tiny HF config of ``family`` in ("qwen3", "qwen3_moe", "llama"); ``overrides`` win.

    Defaults: 2 layers, hidden 64, 4 query heads / 2 KV heads of dim 16, fp32, 256 positions.
    """
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    common: Dict[str, object] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="float32",
        bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )
    if family == "qwen3":
        common.update(rope_theta=1_000_000.0)
        common.update(overrides)
        return Qwen3Config(**common)
    if family == "qwen3_moe":
        common.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1_000_000.0,
                      output_router_logits=False, router_aux_loss_coef=0.0)
        common.update(overrides)
        return Qwen3MoeConfig(**common)
    if family == "llama":
        common.update(rope_theta=10_000.0, tie_word_embeddings=True)
        common.update(overrides)
        return LlamaConfig(**common)
    raise ValueError(f"tiny_config: unknown family {family!r}; choose from 'qwen3', 'qwen3_moe', 'llama'")


def make_tiny_model_dir(
    path: Union[str, os.PathLike], family: str = "qwen3", *, seed: int = 0, vocab_size: int = 512,
    tokenizer: bool = True, **overrides,
) -> Path:
    """Write a random tiny HF checkpoint (config, safetensors, tokenizer) of ``family`` to ``path``.

    The tokenizer's ids for eos/pad are written into the config so generation stops correctly.
    Returns the directory path.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer(vocab_size) if tokenizer else None
    if tok is not None:
        overrides.setdefault("eos_token_id", tok.convert_tokens_to_ids("<|im_end|>"))
        overrides.setdefault("pad_token_id", tok.pad_token_id)
        vocab_size = max(vocab_size, len(tok))
    cfg = tiny_config(family, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(path)
    return path
