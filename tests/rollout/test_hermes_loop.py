"""Hermes tool-call loop: trajectory tokens == chat-template rendering of the whole conversation."""

from __future__ import annotations

import asyncio
import json
from typing import List

import pytest

from megatron_spo.models.tiny import make_tiny_tokenizer
from megatron_spo.rollout.agent_loop import AgentLoopConfig
from megatron_spo.rollout.engine import GenerateResult, SamplingParams
from megatron_spo.rollout.hermes_loop import HermesToolAgentLoop, code_interpreter, parse_tool_calls
from megatron_spo.rollout.sample import RolloutRequest

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


class ScriptedEngine:
    """Plays back scripted turns, cut at the first stop token (kept) or at max_new_tokens."""

    name = "scripted"
    weight_version = 0

    def __init__(self, tok, turns: List[str]):
        self.tok = tok
        self.turns = [tok.encode(t, add_special_tokens=False) for t in turns]
        self.calls = []

    async def agenerate(self, prompt, sampling: SamplingParams) -> GenerateResult:
        i = len(self.calls)
        self.calls.append((list(prompt), sampling))
        ids = self.turns[min(i, len(self.turns) - 1)]
        cut, reason = len(ids), "length"
        for k, t in enumerate(ids):
            if t in sampling.stop_token_ids:
                cut, reason = k + 1, "stop"
                break
        if cut > sampling.max_new_tokens:
            cut, reason = sampling.max_new_tokens, "length"
        return GenerateResult(ids[:cut], [-0.25 - i] * cut, reason, weight_version=0)


class EchoTool:
    def __init__(self):
        self.codes = []

    async def run(self, code: str) -> str:
        self.codes.append(code)
        return "7\n"


def call(code: str) -> str:
    return "<tool_call>" + json.dumps({"name": "code_interpreter", "arguments": {"code": code}}) + "</tool_call>"


MESSAGES = [{"role": "system", "content": "You can run code."}, {"role": "user", "content": "What is 3 + 4?"}]
T1 = "<think>use the tool</think>" + call("3 + 4") + EOS
T2 = "Check again." + call("print(7)") + EOS
T3 = "The answer is \\boxed{7}." + EOS


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_trajectory_equals_template_of_full_conversation(tok):
    tool = EchoTool()
    loop = HermesToolAgentLoop(tok, {"code_interpreter": code_interpreter(tool)})
    engine = ScriptedEngine(tok, [T1, T2, T3])
    s = run(loop.run(engine, RolloutRequest(uid="h", messages=MESSAGES)))
    assert s.finish_reason == "stop" and s.errors == []
    assert (s.assistant_turns, s.user_turns) == (3, 2)
    assert tool.codes == ["print(3 + 4)", "print(7)"]
    conv = MESSAGES + [
        {"role": "assistant", "content": T1[: -len(EOS)]}, {"role": "tool", "content": "7\n"},
        {"role": "assistant", "content": T2[: -len(EOS)]}, {"role": "tool", "content": "7\n"},
        {"role": "assistant", "content": T3[: -len(EOS)]},
    ]
    rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
    # The last assistant message ends with the generated <|im_end|>; the template adds one "\n" after it.
    assert tok.encode(rendered, add_special_tokens=False) == s.prompt_ids + s.response_ids + tok.encode("\n")
    assert s.meta["messages"] == conv


def test_masks_cover_template_separators(tok):
    loop = HermesToolAgentLoop(tok, {"code_interpreter": code_interpreter(EchoTool())})
    s = run(loop.run(ScriptedEngine(tok, [T1, T3]), RolloutRequest(uid="h", messages=MESSAGES)))
    t1 = tok.encode(T1, add_special_tokens=False)
    t3 = tok.encode(T3, add_special_tokens=False)
    # tool turn tokens: the "\n" after the model's <|im_end|>, the tool message, the next generation prompt
    tool_part = tok.encode("\n<|im_start|>tool\n7\n<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert s.response_ids == t1 + tool_part + t3
    assert s.loss_mask == [1] * len(t1) + [0] * len(tool_part) + [1] * len(t3)
    assert s.rollout_logprobs == [-0.25] * len(t1) + [0.0] * len(tool_part) + [-1.25] * len(t3)
    assert loop.sampling(5).stop_token_ids == (tok.eos_token_id,)  # turns end on the eos token


def test_unknown_tool_and_bad_json(tok):
    calls, errors = parse_tool_calls('<tool_call>{"name": "x", "arguments": {}}</tool_call><tool_call>{oops</tool_call>')
    assert calls == [("x", {})] and len(errors) == 1 and "tool call 1" in errors[0]
    bad = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>' + EOS
    loop = HermesToolAgentLoop(tok, {"code_interpreter": code_interpreter(EchoTool())})
    s = run(loop.run(ScriptedEngine(tok, [bad, T3]), RolloutRequest(uid="h", messages=MESSAGES)))
    assert "Error when executing tool: unknown tool 'nope'; available: ['code_interpreter']" in s.response_text
    assert s.metrics["tool_errors"] == 1 and s.finish_reason == "stop"


def test_turn_limit_and_budget(tok):
    loop = HermesToolAgentLoop(tok, {"code_interpreter": code_interpreter(EchoTool())},
                               AgentLoopConfig(max_assistant_turns=2))
    s = run(loop.run(ScriptedEngine(tok, [T1]), RolloutRequest(uid="h", messages=MESSAGES)))
    assert s.finish_reason == "max_assistant_turns" and (s.assistant_turns, s.user_turns) == (2, 1)
    loop2 = HermesToolAgentLoop(tok, {"code_interpreter": code_interpreter(EchoTool())},
                                AgentLoopConfig(max_response_len=12))
    s2 = run(loop2.run(ScriptedEngine(tok, [T1]), RolloutRequest(uid="h", messages=MESSAGES)))
    assert s2.finish_reason == "length" and len(s2.response_ids) == 12


# Qwen-style tool rendering (written for this test): consecutive tool messages share one user turn,
# each wrapped in <tool_response>.
QWEN_LIKE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_qwen_style_parallel_tool_responses_match_template():
    tok = make_tiny_tokenizer()
    tok.chat_template = QWEN_LIKE
    tool = EchoTool()
    loop = HermesToolAgentLoop(tok, {"code_interpreter": code_interpreter(tool)}, max_parallel_calls=2)
    two = "<think>two checks</think>" + call("3 + 4") + call("7") + EOS
    s = run(loop.run(ScriptedEngine(tok, [two, T3]), RolloutRequest(uid="q", messages=MESSAGES)))
    assert (s.assistant_turns, s.user_turns, s.metrics["tool_calls"]) == (2, 1, 2)
    conv = MESSAGES + [{"role": "assistant", "content": two[: -len(EOS)]},
                       {"role": "tool", "content": "7\n"}, {"role": "tool", "content": "7\n"},
                       {"role": "assistant", "content": T3[: -len(EOS)]}]
    rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
    assert tok.encode(rendered, add_special_tokens=False) == s.prompt_ids + s.response_ids + tok.encode("\n")
    tool_part = ("\n<|im_start|>user\n<tool_response>\n7\n\n</tool_response>\n<tool_response>\n7\n\n</tool_response>"
                 "<|im_end|>\n<|im_start|>assistant\n")
    t2 = tok.encode(two, add_special_tokens=False)
    n_tool = len(tok.encode(tool_part, add_special_tokens=False))
    assert s.loss_mask == [1] * len(t2) + [0] * n_tool + [1] * len(tok.encode(T3, add_special_tokens=False))


def test_template_that_rewrites_history_fails_the_sample_clearly():
    tok = make_tiny_tokenizer()
    # a template that trims assistant content (as some reasoning templates rewrite earlier turns)
    tok.chat_template = tok.chat_template.replace("message['content']", "(message['content'] | trim)")
    turn = "  " + call("1 + 1") + EOS          # leading spaces the template would drop
    loop = HermesToolAgentLoop(tok, {"code_interpreter": code_interpreter(EchoTool())})
    s = run(loop.run(ScriptedEngine(tok, [turn, T3]), RolloutRequest(uid="t", messages=MESSAGES)))
    assert s.finish_reason == "error" and s.reward == 0.0
    assert "t/0: the chat template re-renders the conversation differently" in s.errors[-1]


def test_prompt_ids_public_and_used_by_run(tok):
    loop = HermesToolAgentLoop(tok, {"code_interpreter": code_interpreter(EchoTool())})
    req = RolloutRequest(uid="h", messages=MESSAGES)
    expect = tok.encode("<|im_start|>system\nYou can run code.<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
                        "<|im_start|>assistant\n", add_special_tokens=False)
    assert loop.prompt_ids(req) == expect
    engine = ScriptedEngine(tok, [T3])
    s = run(loop.run(engine, req))
    assert s.prompt_ids == expect and engine.calls[0][0] == expect
