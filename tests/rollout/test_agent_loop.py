"""SPO <code> agent loop: exact tokens, masks, log-probs, limits, bad input, aborts (docs/algorithms.md §1.11)."""

from __future__ import annotations

import asyncio
from typing import List, Optional

import pytest

from megatron_spo.models.tiny import make_tiny_tokenizer
from megatron_spo.rollout.agent_loop import (
    ANSWER_FORMAT, SPO_TOOL_INSTRUCTION, AgentLoopConfig, SPOCodeAgentLoop, strip_code_fences,
)
from megatron_spo.rollout.code_tool import interpreter_block, truncate_middle, wrap_last_line_print
from megatron_spo.rollout.engine import EngineError, GenerateResult, SamplingParams
from megatron_spo.rollout.sample import RolloutRequest

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def lp_for(turn: int, n: int) -> List[float]:
    """Distinct, recognisable log-probs per (turn, position)."""
    return [-(turn + 1) - 0.001 * i for i in range(n)]


class ScriptedEngine:
    """Plays back scripted assistant turns as a real engine would: stop string / eos / max tokens.

    Each turn's text is tokenised once (this is the "model"); the engine cuts it right after the
    first token where a stop string appears (kept), at an eos token (kept), or at
    ``max_new_tokens`` ("length"). Text that ends without stop or eos means the model would have
    kept going: "length".
    """

    name = "scripted"

    def __init__(self, tok, turns: List[str], version: int = 0):
        self.tok = tok
        self.turns = [tok.encode(t, add_special_tokens=False) for t in turns]
        self.calls: List[tuple] = []
        self.version = version

    @property
    def weight_version(self) -> int:
        return self.version

    async def agenerate(self, prompt, sampling: SamplingParams) -> GenerateResult:
        i = len(self.calls)
        self.calls.append((list(prompt), sampling))
        ids = self.turns[i % len(self.turns)]
        lps = lp_for(i, len(ids))
        cut, reason = len(ids), "length"
        for k in range(len(ids)):
            text = self.tok.decode(ids[: k + 1], skip_special_tokens=False)
            if ids[k] in sampling.stop_token_ids or ids[k] == self.tok.eos_token_id or any(s in text for s in sampling.stop):
                cut, reason = k + 1, "stop"
                break
        if cut > sampling.max_new_tokens:
            cut, reason = sampling.max_new_tokens, "length"
        await asyncio.sleep(0)
        return GenerateResult(token_ids=ids[:cut], logprobs=lps[:cut], finish_reason=reason,
                              weight_version=self.version, prompt_len=len(prompt))


class FakeTool:
    def __init__(self, reply="5\n", raises: Optional[Exception] = None, hang: bool = False):
        self.reply, self.raises, self.hang = reply, raises, hang
        self.codes: List[str] = []

    async def run(self, code: str) -> str:
        self.codes.append(code)
        if self.hang:
            await asyncio.sleep(3600)
        if self.raises is not None:
            raise self.raises
        return self.reply


TURN1 = "Let me compute.<code>\n```python\nx = 2\nx + 3\n```\n</code>"
TURN2 = "<think>ok</think> The answer is \\boxed{5}." + EOS
PROBLEM = "What is 2 + 3?"


def request(**kw):
    return RolloutRequest(uid="r0", messages=[{"role": "user", "content": PROBLEM}], ground_truth="5", **kw)


def run(coro):
    return asyncio.run(coro)


def test_prompt_is_recipe_string_through_template(tok):
    loop = SPOCodeAgentLoop(tok, FakeTool())
    ids = loop.prompt_ids(request())
    text = ("<|im_start|>user\n" + SPO_TOOL_INSTRUCTION + PROBLEM + ANSWER_FORMAT + "<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert ids == tok.encode(text, add_special_tokens=False)
    assert "*user question:*\nWhat is 2 + 3?\nThe answer format must be: \\boxed{'The final answer goes here.'}" in text
    # the suffix is not doubled when the dataset already added it
    req2 = RolloutRequest(uid="r1", messages=[{"role": "user", "content": PROBLEM + ANSWER_FORMAT}])
    assert loop.prompt_ids(req2) == ids


def test_two_turn_trajectory_exact_tokens_masks_logprobs(tok):
    engine = ScriptedEngine(tok, [TURN1, TURN2], version=3)
    tool = FakeTool("5\n")
    loop = SPOCodeAgentLoop(tok, tool, AgentLoopConfig(max_response_len=500))
    s = run(loop.run(engine, request()))
    t1 = tok.encode(TURN1, add_special_tokens=False)
    t2 = tok.encode(TURN2, add_special_tokens=False)
    interp = tok.encode("<interpreter>\n5\n\n</interpreter>\n\n", add_special_tokens=False)
    assert s.finish_reason == "stop" and s.errors == []
    assert s.response_ids == t1 + interp + t2
    assert s.loss_mask == [1] * len(t1) + [0] * len(interp) + [1] * len(t2)
    assert s.rollout_logprobs == lp_for(0, len(t1)) + [0.0] * len(interp) + lp_for(1, len(t2))
    assert (s.assistant_turns, s.user_turns, s.num_turns) == (2, 1, 4)
    assert s.weight_versions == [3, 3]
    # fences stripped, first line kept, last line print-wrapped
    assert tool.codes == ["x = 2\nprint(x + 3)"]
    # second engine call saw prompt + turn 1 + interpreter tokens, token for token
    assert engine.calls[1][0] == s.prompt_ids + t1 + interp
    assert engine.calls[0][1].stop == ("</code>",)
    assert engine.calls[0][1].max_new_tokens == 500
    assert engine.calls[1][1].max_new_tokens == 500 - len(t1) - len(interp)
    assert s.response_text == TURN1 + "<interpreter>\n5\n\n</interpreter>\n\n" + TURN2


def test_golden_matches_chat_template_rendering(tok):
    """prompt + model text + raw interpreter text == template rendering of one assistant message."""
    engine = ScriptedEngine(tok, [TURN1, TURN1, TURN2])
    loop = SPOCodeAgentLoop(tok, FakeTool("5\n"))
    s = run(loop.run(engine, request()))
    content = TURN1 + interpreter_block("5\n") + TURN1 + interpreter_block("5\n") + TURN2[: -len(EOS)]
    conv = [{"role": "user", "content": SPO_TOOL_INSTRUCTION + PROBLEM + ANSWER_FORMAT},
            {"role": "assistant", "content": content}]
    rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
    # the template closes the message with <|im_end|> plus a "\n" separator the model never generates
    assert rendered == tok.decode(s.prompt_ids + s.response_ids, skip_special_tokens=False) + "\n"
    assert tok.encode(rendered, add_special_tokens=False) == s.prompt_ids + s.response_ids + tok.encode("\n")


def test_only_first_code_block_runs_and_strip_fences():
    assert strip_code_fences("\n```python\nprint(1)\n```\n") == "print(1)"
    assert strip_code_fences("print(2)") == "print(2)"
    assert wrap_last_line_print("a = 1\nprint(a)\n\n") == "a = 1\nprint(a)\n\n"
    assert wrap_last_line_print("a = 1\na * 2\n  \n") == "a = 1\nprint(a * 2)\n  \n"


def test_first_block_only(tok):
    two = "<code>\n```python\n1 + 1\n```\n</code>"  # the stop string cuts the turn after the first block
    engine = ScriptedEngine(tok, [two + "<code>print(9)</code>", TURN2])
    tool = FakeTool("2\n")
    s = run(SPOCodeAgentLoop(tok, tool).run(engine, request()))
    assert tool.codes == ["print(1 + 1)"]
    assert s.user_turns == 1


def test_max_assistant_turns(tok):
    engine = ScriptedEngine(tok, [TURN1])  # always writes code
    tool = FakeTool("5\n")
    s = run(SPOCodeAgentLoop(tok, tool, AgentLoopConfig(max_assistant_turns=3)).run(engine, request()))
    assert s.finish_reason == "max_assistant_turns"
    assert (s.assistant_turns, s.user_turns) == (3, 2)  # limit is checked before the 3rd tool call
    assert len(tool.codes) == 2


def test_max_user_turns(tok):
    engine = ScriptedEngine(tok, [TURN1])
    s = run(SPOCodeAgentLoop(tok, FakeTool(), AgentLoopConfig(max_assistant_turns=8, max_user_turns=2))
            .run(engine, request()))
    assert s.finish_reason == "max_user_turns"
    assert (s.assistant_turns, s.user_turns) == (3, 2)


def test_token_budget_counts_model_and_tool_tokens(tok):
    t1 = len(tok.encode(TURN1, add_special_tokens=False))
    interp = len(tok.encode(interpreter_block("5\n"), add_special_tokens=False))
    budget = 2 * (t1 + interp) + 5  # room for two full rounds and 5 tokens of a third turn
    engine = ScriptedEngine(tok, [TURN1])
    s = run(SPOCodeAgentLoop(tok, FakeTool("5\n"), AgentLoopConfig(max_response_len=budget)).run(engine, request()))
    assert s.finish_reason == "length"
    assert len(s.response_ids) == budget
    assert engine.calls[-1][1].max_new_tokens == 5
    assert sum(s.loss_mask) == 2 * t1 + 5


def test_tool_output_that_would_exceed_budget_is_not_appended(tok):
    t1 = len(tok.encode(TURN1, add_special_tokens=False))
    engine = ScriptedEngine(tok, [TURN1, TURN2])
    s = run(SPOCodeAgentLoop(tok, FakeTool("x" * 1000), AgentLoopConfig(max_response_len=t1 + 20))
            .run(engine, request()))
    assert s.finish_reason == "tool_overflow"
    assert len(s.response_ids) == t1 and s.loss_mask == [1] * t1
    assert s.user_turns == 0


def test_tool_text_truncated_in_the_middle(tok):
    long = "".join(chr(ord("a") + i % 26) for i in range(1000))
    engine = ScriptedEngine(tok, [TURN1, TURN2])
    s = run(SPOCodeAgentLoop(tok, FakeTool(long)).run(engine, request()))
    expect = long[:128] + "...(truncated)..." + long[-128:]
    assert truncate_middle(long, 256) == expect
    assert "<interpreter>\n" + expect + "\n</interpreter>\n\n" in s.response_text


def test_no_code_block_ends_the_rollout(tok):
    engine = ScriptedEngine(tok, [TURN2])
    s = run(SPOCodeAgentLoop(tok, FakeTool()).run(engine, request()))
    assert s.finish_reason == "stop" and s.assistant_turns == 1 and s.user_turns == 0
    assert s.loss_mask == [1] * len(s.response_ids)


def test_tool_that_raises_becomes_error_text(tok):
    engine = ScriptedEngine(tok, [TURN1, TURN2])
    s = run(SPOCodeAgentLoop(tok, FakeTool(raises=RuntimeError("boom"))).run(engine, request()))
    assert "<interpreter>\nError when executing tool: boom\n</interpreter>" in s.response_text
    assert s.metrics["tool_errors"] == 1 and s.metrics["tool_calls"] == 1
    assert s.finish_reason == "stop"


def test_tool_that_hangs_times_out(tok):
    engine = ScriptedEngine(tok, [TURN1, TURN2])
    cfg = AgentLoopConfig(tool_timeout_s=0.2)
    s = run(asyncio.wait_for(SPOCodeAgentLoop(tok, FakeTool(hang=True), cfg).run(engine, request()), 10))
    assert "Error when executing tool: tool call timed out after 0.2s" in s.response_text
    assert s.metrics["tool_errors"] == 1 and s.assistant_turns == 2


def test_prompt_longer_than_limit_is_a_sample_error(tok):
    engine = ScriptedEngine(tok, [TURN2])
    s = run(SPOCodeAgentLoop(tok, FakeTool(), AgentLoopConfig(max_prompt_len=50)).run(engine, request()))
    assert s.finish_reason == "error" and s.reward == 0.0
    assert "max_prompt_len 50" in s.errors[0] and "r0/0" in s.errors[0]
    assert engine.calls == []  # never reached the engine
    s2 = run(SPOCodeAgentLoop(tok, FakeTool(), AgentLoopConfig(context_len=60)).run(engine, request()))
    assert s2.finish_reason == "error" and "context_len 60" in s2.errors[0]


def test_context_len_caps_each_turn(tok):
    engine = ScriptedEngine(tok, [TURN1, TURN2])
    loop = SPOCodeAgentLoop(tok, FakeTool(), AgentLoopConfig(context_len=10_000, max_response_len=8192))
    p = len(loop.prompt_ids(request()))
    loop.cfg.context_len = p + 10
    s = run(loop.run(engine, request()))
    assert engine.calls[0][1].max_new_tokens == 10
    assert s.finish_reason == "length" and len(s.response_ids) == 10


def test_stop_string_never_met_is_length(tok):
    engine = ScriptedEngine(tok, ["I keep thinking and thinking " * 20])
    s = run(SPOCodeAgentLoop(tok, FakeTool(), AgentLoopConfig(max_response_len=40)).run(engine, request()))
    assert s.finish_reason == "length" and len(s.response_ids) == 40 and s.assistant_turns == 1


class AbortOnceEngine(ScriptedEngine):
    """First call returns the first ``k`` tokens of turn 0 with "abort" at version 0; the engine is then at version 1."""

    def __init__(self, tok, turns, k):
        super().__init__(tok, turns, version=0)
        self.k = k
        self.aborted = False

    async def agenerate(self, prompt, sampling):
        if not self.aborted:
            self.aborted = True
            self.calls.append((list(prompt), sampling))
            ids = self.turns[0][: self.k]
            self.version = 1
            return GenerateResult(ids, lp_for(9, len(ids)), "abort", weight_version=0)
        # resume: the rest of turn 0 (given the partial prefix) or the whole turn (restart)
        i = len(self.calls)
        self.calls.append((list(prompt), sampling))
        prompt_tail = list(prompt)[-self.k:]
        full = self.turns[0]
        rest = full[self.k:] if prompt_tail == full[: self.k] else full
        if i >= 2:
            rest = self.turns[1]
        return GenerateResult(rest, lp_for(i, len(rest)), "stop", weight_version=self.version)


def test_abort_resumed_keeps_partial_tokens_and_versions(tok):
    engine = AbortOnceEngine(tok, [TURN1, TURN2], k=4)
    loop = SPOCodeAgentLoop(tok, FakeTool(), AgentLoopConfig(on_abort="resume", max_response_len=300))
    s = run(loop.run(engine, request()))
    t1 = tok.encode(TURN1, add_special_tokens=False)
    assert engine.calls[1][0] == s.prompt_ids + t1[:4]          # resumed from the partial tokens
    assert engine.calls[1][1].max_new_tokens == 300 - 4
    assert s.response_ids[: len(t1)] == t1
    assert s.rollout_logprobs[:4] == lp_for(9, 4)                # partial tokens keep their own log-probs
    assert s.rollout_logprobs[4: len(t1)] == lp_for(1, len(t1) - 4)
    assert s.weight_versions == [0, 1, 1] and s.min_weight_version == 0
    assert s.metrics["aborts"] == 1 and s.finish_reason == "stop"


def test_abort_restarted_drops_partial_tokens(tok):
    engine = AbortOnceEngine(tok, [TURN1, TURN2], k=4)
    loop = SPOCodeAgentLoop(tok, FakeTool(), AgentLoopConfig(on_abort="restart"))
    s = run(loop.run(engine, request()))
    t1 = tok.encode(TURN1, add_special_tokens=False)
    assert engine.calls[1][0] == s.prompt_ids                    # regenerated from scratch
    assert s.response_ids[: len(t1)] == t1
    assert s.rollout_logprobs[: len(t1)] == lp_for(1, len(t1))
    assert s.weight_versions == [1, 1] and s.min_weight_version == 1


def test_engine_hang_raises_engine_error(tok):
    class Hang(ScriptedEngine):
        async def agenerate(self, prompt, sampling):
            await asyncio.sleep(3600)

    loop = SPOCodeAgentLoop(tok, FakeTool(), AgentLoopConfig(engine_timeout_s=0.2))
    with pytest.raises(EngineError, match="did not answer within 0.2s"):
        run(asyncio.wait_for(loop.run(Hang(tok, [TURN2]), request()), 10))


def test_endless_aborts_raise_engine_error(tok):
    class AlwaysAbort(ScriptedEngine):
        async def agenerate(self, prompt, sampling):
            self.calls.append(1)
            return GenerateResult([5], [-0.5], "abort", weight_version=0)

    loop = SPOCodeAgentLoop(tok, FakeTool(), AgentLoopConfig(max_aborts=3))
    with pytest.raises(EngineError, match="aborted 4 times"):
        run(loop.run(AlwaysAbort(tok, [TURN2]), request()))
