"""Hermes-style tool calls through the chat template (verl ``ToolAgentLoop`` / ``retool`` variant).

The model ends an assistant turn with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
and its end-of-turn token. Each call runs on the named tool; the results become ``role: "tool"``
messages rendered **by the chat template** (for Qwen that is a user turn with
``<tool_response>``; the tiny ChatML template renders a ``tool`` turn), followed by the generation
prompt of the next assistant turn. Those template tokens are appended with loss mask 0 and
log-prob 0.0; generated ids are kept as returned (token-in/token-out).

How the template tokens are found without dropping separators: the trajectory so far decodes to
``S`` (prompt + every generated and appended token). The conversation (messages + assistant
contents + new tool messages) is rendered with ``add_generation_prompt=True`` into ``R``; ``R`` must
start with ``S`` and ``R[len(S):]`` (e.g. ``"\\n<|im_start|>tool\\n...<|im_end|>\\n<|im_start|>assistant\\n"``:
the newline after the model's ``<|im_end|>`` belongs to the template) is tokenised raw and appended.
A template that re-renders earlier turns differently (so ``R`` does not extend ``S``) fails the
sample with an error naming it, instead of silently training on a sequence the template would
never produce.

Limits, budget, timeouts and abort handling are those of :class:`AgentLoopConfig`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

from megatron_spo.rollout.agent_loop import (
    AgentLoopConfig, call_tool, check_prompt, finish, model_turn, start_sample, turn_limit_reached,
)
from megatron_spo.rollout.code_tool import CodeTool, truncate_middle, wrap_last_line_print
from megatron_spo.rollout.engine import Engine, SamplingParams
from megatron_spo.rollout.sample import RolloutRequest, Sample

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
ToolFn = Callable[[Dict[str, Any]], Awaitable[str]]

CODE_INTERPRETER_SCHEMA = {
    "type": "function",
    "function": {
        "name": "code_interpreter",
        "description": "Run a complete Python script in a stateless sandbox and return its stdout and stderr.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "The script."}},
                       "required": ["code"]},
    },
}


def code_interpreter(tool: CodeTool, wrap_print: bool = True) -> ToolFn:
    """Adapt a :class:`CodeTool` to a Hermes tool taking ``{"code": str}``."""

    async def run(arguments: Dict[str, Any]) -> str:
        code = arguments.get("code")
        if not isinstance(code, str):
            raise ValueError(f"code_interpreter needs a string argument 'code', got {type(code).__name__}")
        return await tool.run(wrap_last_line_print(code) if wrap_print else code)

    return run


def parse_tool_calls(text: str) -> Tuple[List[Tuple[str, Dict[str, Any]]], List[str]]:
    """``(calls, errors)`` from the ``<tool_call>`` blocks of ``text``; a malformed block is an error, skipped."""
    calls, errors = [], []
    for i, block in enumerate(TOOL_CALL.findall(text)):
        try:
            obj = json.loads(block)
            name, args = obj["name"], obj.get("arguments", {})
            if isinstance(args, str):  # some models emit the arguments JSON-encoded twice
                args = json.loads(args)
            if not isinstance(name, str) or not isinstance(args, dict):
                raise ValueError("'name' must be a string and 'arguments' an object")
            calls.append((name, args))
        except (ValueError, KeyError, TypeError) as e:
            errors.append(f"tool call {i}: {type(e).__name__}: {e} in {block[:80]!r}")
    return calls, errors


class HermesToolAgentLoop:
    """Multi-turn tool use with ``<tool_call>`` JSON and chat-template tool messages.

    Args:
        tokenizer: HF tokenizer with a chat template.
        tools: tool name -> ``async fn(arguments) -> str``.
        config: limits and sampling (``max_user_turns`` counts tool turns).
        tool_schemas: passed to ``apply_chat_template(tools=...)`` for the prompt.
        max_parallel_calls: calls executed per assistant turn (one tool message each).
    """

    def __init__(self, tokenizer, tools: Dict[str, ToolFn], config: Optional[AgentLoopConfig] = None,
                 tool_schemas: Optional[List[Dict[str, Any]]] = None, max_parallel_calls: int = 1):
        self.tokenizer = tokenizer
        self.tools = dict(tools)
        self.cfg = config or AgentLoopConfig()
        self.tool_schemas = tool_schemas
        self.max_parallel_calls = max_parallel_calls
        self.eos_text = tokenizer.eos_token or ""

    def _render(self, messages: List[Dict[str, Any]]) -> str:
        kwargs = dict(self.cfg.chat_template_kwargs)
        if self.tool_schemas:
            kwargs["tools"] = self.tool_schemas
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    def prompt_ids(self, request: RolloutRequest) -> List[int]:
        """The prompt ids ``run`` sends for ``request``: its messages (and tool schemas) through the template."""
        if request.messages is None:
            raise ValueError(f"request {request.uid}: the Hermes loop needs messages (it re-renders the conversation)")
        return self.tokenizer.encode(self._render([dict(m) for m in request.messages]), add_special_tokens=False)

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        eos = self.tokenizer.eos_token_id
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                              top_k=self.cfg.top_k, stop_token_ids=(eos,) if eos is not None else ())

    async def _run_call(self, name: str, args: Dict[str, Any], sample: Sample) -> str:
        fn = self.tools.get(name)

        async def invoke() -> str:
            if fn is None:
                raise LookupError(f"unknown tool {name!r}; available: {sorted(self.tools)}")
            return await fn(args)

        return await call_tool(invoke, self.cfg.tool_timeout_s, sample)

    async def run(self, engine: Engine, request: RolloutRequest, group_index: int = 0) -> Sample:
        cfg = self.cfg
        sample = start_sample(request, group_index, self.prompt_ids(request))
        conv = [dict(m) for m in request.messages]
        if not check_prompt(sample, cfg):
            return sample
        # model_turn returns None when the budget leaves no room for another turn.
        while (turn := await model_turn(engine, sample, cfg, self.sampling)) is not None:
            ids, engine_finish = turn
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            content = text[: -len(self.eos_text)] if self.eos_text and text.endswith(self.eos_text) else text
            conv.append({"role": "assistant", "content": content})
            if turn_limit_reached(sample, cfg, engine_finish):
                break
            calls, parse_errors = parse_tool_calls(content)
            for e in parse_errors:
                sample.count("tool_parse_errors")
                sample.errors.append(e)
            if not calls:
                sample.finish_reason = "stop"
                break
            tool_msgs = []
            for name, args in calls[: self.max_parallel_calls]:
                result = await self._run_call(name, args, sample)
                tool_msgs.append({"role": "tool", "content": truncate_middle(result, cfg.tool_response_max_chars)})
            so_far = self.tokenizer.decode(sample.prompt_ids + sample.response_ids, skip_special_tokens=False)
            rendered = self._render(conv + tool_msgs)
            if not rendered.startswith(so_far):
                at = next((i for i, (a, b) in enumerate(zip(so_far, rendered)) if a != b), min(len(so_far), len(rendered)))
                sample.fail(f"sample {sample.uid}: the chat template re-renders the conversation differently from the "
                            f"generated tokens at char {at} ({so_far[at:at + 40]!r} vs {rendered[at:at + 40]!r}); "
                            f"cannot append tool turn {sample.user_turns + 1} token-in/token-out")
                break
            delta = self.tokenizer.encode(rendered[len(so_far):], add_special_tokens=False)
            if len(sample.response_ids) + len(delta) >= cfg.max_response_len:
                sample.finish_reason = "tool_overflow"
                break
            sample.append_context_tokens(delta)
            sample.user_turns += 1
            conv.extend(tool_msgs)
        sample.meta["messages"] = conv
        return finish(sample, self.tokenizer)
