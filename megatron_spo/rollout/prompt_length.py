"""Prompt lengths in tokens exactly as the rollout will send them, without an engine.

The trainer checks every dataset row against ``data.max_prompt_len`` when it starts, before the model
is built (:func:`load_train_prompts`, with :func:`megatron_spo.data.check_prompt_lengths`). The length
depends on the agent loop (``rollout.agent``): ``spo_code`` wraps the problem in the SPO tool
instruction, ``hermes`` adds its tool schemas to the chat template. :func:`prompt_length_fn` builds
that agent loop (no engine, no sandbox: rendering a prompt uses neither) and measures with the same
``prompt_ids`` that :meth:`RolloutPhase.prepare <megatron_spo.rollout.phase.RolloutPhase.prepare>` calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from megatron_spo.config import Config, ConfigError, RolloutConfig
from megatron_spo.data import PromptDataset, check_prompt_lengths, load_prompts
from megatron_spo.rollout.phase import build_agent_loop, loop_config
from megatron_spo.rollout.sample import RolloutRequest


class _NoTool:
    """Stands in for the sandbox: the tool loops need a tool object, rendering a prompt never calls it."""

    async def run(self, code: str) -> str:
        raise RuntimeError("prompt_length_fn's agent loop does not run tools")


def prompt_length_fn(cfg: RolloutConfig, tokenizer) -> Callable[[List[Dict[str, str]]], int]:
    """``length(messages)``: tokens of the prompt the ``cfg.agent`` loop renders for ``messages``."""
    loop = build_agent_loop(cfg.agent, tokenizer, loop_config(cfg), tool=_NoTool())

    def length(messages: List[Dict[str, str]]) -> int:
        return len(loop.prompt_ids(RolloutRequest(uid="length-check", messages=[dict(m) for m in messages])))

    return length


def load_train_prompts(cfg: Config) -> Tuple[PromptDataset, Any]:
    """``data.train_path`` with every row validated, its prompt length against ``data.max_prompt_len``
    included, and the policy's tokenizer (``model.path``). Needs no model, engine or process group.

    Raises:
        ConfigError: ``model.path`` or ``data.train_path`` unset.
        DataError: a bad row (see :func:`~megatron_spo.data.load_prompts` and
            :func:`~megatron_spo.data.check_prompt_lengths`).
        FileNotFoundError: ``model.path`` has no ``config.json``.
    """
    from transformers import AutoTokenizer

    if not cfg.model.path or not cfg.data.train_path:
        raise ConfigError("model.path and data.train_path must be set to train")
    d = cfg.data
    dataset = load_prompts(d.train_path, d.prompt_key, d.answer_key, skip_bad_rows=d.skip_bad_rows)
    if not (Path(cfg.model.path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path {cfg.model.path!r}: no HF config.json there")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    dataset = check_prompt_lengths(dataset, prompt_length_fn(cfg.rollout, tokenizer), d.max_prompt_len,
                                   skip_bad_rows=d.skip_bad_rows)
    return dataset, tokenizer
