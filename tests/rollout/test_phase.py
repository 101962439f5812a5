"""The shared rollout phase: n samples per record, rewards, counts and metrics, agent selection, bad input."""

from __future__ import annotations

import asyncio
import logging
from typing import List

import pytest

from megatron_spo.config import RolloutConfig
from megatron_spo.data import DataError, PromptRecord
from megatron_spo.models.tiny import make_tiny_model_dir
from megatron_spo.rollout.agent_loop import SPO_TOOL_INSTRUCTION, spo_user_prompt
from megatron_spo.rollout.embedded.engine import EmbeddedEngine
from megatron_spo.rollout.engine import EngineError, GenerateResult, SamplingParams
from megatron_spo.rollout.phase import RolloutPhase, rollout


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # 1024 positions: the SPO tool instruction alone is ~520 tokens with the tiny tokenizer
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "qwen3", max_position_embeddings=1024)
    eng = EmbeddedEngine(str(path), seed=3)
    yield eng
    eng.close()


def records(n: int = 3) -> List[PromptRecord]:
    return [PromptRecord(index=10 + i, messages=[{"role": "user", "content": f"What is {i} + 4?"}],
                         answer=str(i + 4), key=f"What is {i} + 4?") for i in range(n)]


def first_token_even(response, ground_truth, sample=None, **kw):
    """A reward whose value the test can recompute from the sample's tokens."""
    return float(sample.response_ids[0] % 2 == 0)


def template_ids(tok, text: str) -> List[int]:
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok.encode(rendered, add_special_tokens=False)


def test_single_turn_embedded_n_samples_rewards_and_counts(engine):
    tok = engine.tokenizer
    cfg = RolloutConfig(agent="single_turn", max_response_len=10, temperature=0.6, top_p=0.95, top_k=20)
    recs = records(3)
    batch = rollout(recs, 4, engine=engine, tokenizer=tok, cfg=cfg, reward=first_token_even,
                    max_prompt_len=64, context_len=engine.max_context)
    assert len(batch.samples) == 12
    groups = batch.groups()
    assert [len(g) for g in groups] == [4, 4, 4]
    for rec, group in zip(recs, groups):
        assert [s.group_index for s in group] == [0, 1, 2, 3]
        for s in group:
            assert s.ok and s.key == rec.key and s.ground_truth == rec.answer and s.meta["row"] == rec.index
            assert s.prompt_ids == template_ids(tok, rec.messages[0]["content"])
            assert 1 <= len(s.response_ids) <= 10 and sum(s.loss_mask) == len(s.response_ids)
            assert s.reward == float(s.response_ids[0] % 2 == 0)
            assert s.response_text == tok.decode(s.response_ids, skip_special_tokens=False)
    rewards = [s.reward for s in batch.samples]
    m = batch.metrics
    assert m["rollout/samples"] == 12 and m["rollout/errors"] == 0 and m["rollout/prompts"] == 3
    assert m["rollout/reward_mean"] == pytest.approx(sum(rewards) / 12)
    assert m["rollout/tokens_generated"] == sum(len(s.response_ids) for s in batch.samples)
    assert m["rollout/tokens_per_s"] > 0 and m["rollout/tool_calls"] == 0
    assert m["rollout/assistant_turns_mean"] == 1 and m["rollout/turns_mean"] == 2
    finish = {k.split("/")[-1]: v for k, v in m.items() if k.startswith("rollout/finish/")}
    assert sum(finish.values()) == 12
    assert finish == {r: float(sum(s.finish_reason == r for s in batch.samples)) for r in finish}


def test_phase_is_reusable_per_step_in_both_modes(engine):
    cfg = RolloutConfig(max_response_len=4)
    with RolloutPhase(engine, engine.tokenizer, cfg, reward=first_token_even) as phase:
        a = phase.run(records(2), 1)                    # SPO step: one response per prompt
        b = phase.run(records(3), 2, mode="group")      # GRPO step: groups of 2
    assert len(a.samples) == 2 and len({s.uid for s in a.samples}) == 2
    assert len(b.samples) == 6 and [len(g) for g in b.groups()] == [2, 2, 2]
    assert not {s.uid for s in a.samples} & {s.uid for s in b.samples}
    assert all(len(s.response_ids) <= 4 for s in a.samples + b.samples)


class FakeTool:
    def __init__(self):
        self.codes: List[str] = []

    async def run(self, code: str) -> str:
        self.codes.append(code)
        return "2\n"


class ScriptedCodeEngine:
    """Turn 1: a ``<code>`` block ending at the stop string; after the tool output: a boxed answer + eos."""

    name = "scripted"

    def __init__(self, tok, fail_marker: str = "\x00"):
        self.tok, self.fail_marker, self.calls = tok, fail_marker, 0

    weight_version = 0

    async def agenerate(self, prompt, sampling: SamplingParams, request_id=None) -> GenerateResult:
        self.calls += 1
        text = self.tok.decode(prompt, skip_special_tokens=False)
        if self.fail_marker in text:
            raise EngineError("server answered 500")
        if "<interpreter>" not in text.split("<|im_start|>assistant")[-1]:  # the instruction names the tag too
            assert sampling.stop == ("</code>",)
            out = "<think>let us compute <code>\n```python\n1 + 1\n```\n</code>"
        else:
            out = "so</think> The answer is \\boxed{2}<|im_end|>"
        ids = self.tok.encode(out, add_special_tokens=False)
        await asyncio.sleep(0)
        return GenerateResult(ids, [-0.5] * len(ids), "stop", 0, len(prompt))


def test_spo_code_agent_with_fake_tool_scripted_engine(engine):
    tok = engine.tokenizer
    tool = FakeTool()
    eng = ScriptedCodeEngine(tok)
    cfg = RolloutConfig(agent="spo_code", max_response_len=200)
    recs = [PromptRecord(0, [{"role": "user", "content": "What is 1 + 1?"}], "2", "What is 1 + 1?"),
            PromptRecord(1, [{"role": "user", "content": "What is 2 + 0?"}], "3", "What is 2 + 0?")]
    batch = rollout(recs, 2, engine=eng, tokenizer=tok, cfg=cfg, reward="spo_strict_boxed", tool=tool)
    assert len(batch.samples) == 4 and eng.calls == 8  # two turns per sample
    assert tool.codes == ["print(1 + 1)"] * 4
    for s in batch.samples:
        assert s.prompt_ids == template_ids(tok, spo_user_prompt(s.key))
        assert s.assistant_turns == 2 and s.user_turns == 1 and s.finish_reason == "stop"
        assert s.metrics["tool_calls"] == 1
        # tool tokens are context: loss mask 0, rollout log-prob 0
        assert 0 in s.loss_mask and all(lp == 0.0 for lp, m in zip(s.rollout_logprobs, s.loss_mask) if m == 0)
        assert s.reward == (1.0 if s.ground_truth == "2" else 0.0)  # strict boxed: "2" matches only row 0
    m = batch.metrics
    assert m["rollout/tool_calls"] == 4 and m["rollout/turns_mean"] == 4  # 2 assistant + 1 tool + 1
    assert m["rollout/reward_mean"] == 0.5
    assert m["rollout/tokens_generated"] == sum(sum(s.loss_mask) for s in batch.samples)
    assert m["rollout/tokens_generated"] < m["rollout/response_tokens"]


def test_spo_code_agent_with_fake_tool_embedded_engine(engine):
    tool = FakeTool()
    cfg = RolloutConfig(agent="spo_code", max_response_len=16, max_assistant_turns=3)
    batch = rollout(records(2), 3, engine=engine, tokenizer=engine.tokenizer, cfg=cfg, reward=first_token_even,
                    tool=tool, context_len=engine.max_context)
    assert len(batch.samples) == 6 and batch.metrics["rollout/errors"] == 0
    for s in batch.samples:
        assert SPO_TOOL_INSTRUCTION in engine.tokenizer.decode(s.prompt_ids)
        assert len(s.response_ids) <= 16 and s.reward == float(s.response_ids[0] % 2 == 0)
    assert batch.metrics["rollout/tool_calls"] == len(tool.codes)


def test_failed_samples_are_counted_not_fatal(engine):
    tok = engine.tokenizer
    eng = ScriptedCodeEngine(tok, fail_marker="2 + 0")
    recs = [PromptRecord(0, [{"role": "user", "content": "What is 1 + 1?"}], "2", "What is 1 + 1?"),
            PromptRecord(1, [{"role": "user", "content": "What is 2 + 0?"}], "2", "What is 2 + 0?")]
    with RolloutPhase(eng, tok, RolloutConfig(agent="spo_code", max_response_len=200), reward="spo_strict_boxed",
                      tool=FakeTool(), max_retries=1) as phase:
        batch = phase.run(recs, 2)
    bad = [s for s in batch.samples if not s.ok]
    assert [s.key for s in bad] == ["What is 2 + 0?"] * 2
    assert all(s.reward == 0.0 and "500" in s.errors[-1] for s in bad)
    assert batch.metrics["rollout/errors"] == 2 and batch.metrics["rollout/retries"] == 2
    assert batch.metrics["rollout/reward_mean"] == 1.0  # over the samples that did not fail


def test_overlong_prompt_is_an_error_naming_the_row_or_a_counted_skip(engine, caplog):
    tok = engine.tokenizer
    recs = records(2) + [PromptRecord(7, [{"role": "user", "content": "plus " * 40}], "1", "plus")]
    cfg = RolloutConfig(max_response_len=4)
    limit = len(template_ids(tok, "plus " * 40)) - 1
    with pytest.raises(DataError, match=r"row 7 \(prompt 'plus'\): prompt is \d+ tokens, longer than "
                                        rf"data.max_prompt_len={limit}"):
        rollout(recs, 1, engine=engine, tokenizer=tok, cfg=cfg, reward=first_token_even, max_prompt_len=limit)
    with caplog.at_level(logging.WARNING):
        batch = rollout(recs, 2, engine=engine, tokenizer=tok, cfg=cfg, reward=first_token_even,
                        max_prompt_len=limit, skip_bad_rows=True)
    assert list(batch.skipped) == [7] and batch.metrics["rollout/skipped_prompts"] == 1
    assert len(batch.samples) == 4 and {s.meta["row"] for s in batch.samples} == {10, 11}
    assert "skipped 1 over-long prompt" in caplog.text
    # the engine's context counts too: a prompt that leaves no room to generate
    with pytest.raises(DataError, match="row 7 .* leaving no room in the engine's context of 40"):
        rollout(recs, 1, engine=engine, tokenizer=tok, cfg=cfg, reward=first_token_even, context_len=40)


class ScriptedHermesEngine:
    """Turn 1: a ``<tool_call>`` for code_interpreter; after the tool turn: a boxed answer. Both end with eos."""

    name = "scripted_hermes"
    weight_version = 0

    def __init__(self, tok):
        self.tok, self.prompts = tok, []

    async def agenerate(self, prompt, sampling: SamplingParams, request_id=None) -> GenerateResult:
        self.prompts.append(list(prompt))
        text = self.tok.decode(prompt, skip_special_tokens=False)
        if "<|im_start|>tool" not in text:
            out = '<tool_call>{"name": "code_interpreter", "arguments": {"code": "1 + 1"}}</tool_call><|im_end|>'
        else:
            out = "The answer is \\boxed{2}<|im_end|>"
        ids = self.tok.encode(out, add_special_tokens=False)
        await asyncio.sleep(0)
        return GenerateResult(ids, [-0.25] * len(ids), "stop", 0, len(prompt))


def test_hermes_agent_selected_by_config(engine):
    tok = engine.tokenizer
    tool = FakeTool()
    eng = ScriptedHermesEngine(tok)
    recs = [PromptRecord(0, [{"role": "user", "content": "What is 1 + 1?"}], "2", "What is 1 + 1?")]
    batch = rollout(recs, 2, engine=eng, tokenizer=tok, cfg=RolloutConfig(agent="hermes", max_response_len=200),
                    reward="math_verify", tool=tool)
    assert tool.codes == ["print(1 + 1)"] * 2 and len(eng.prompts) == 4
    for s in batch.samples:
        assert s.ok and s.assistant_turns == 2 and s.user_turns == 1 and s.reward == 1.0
        assert s.prompt_ids == template_ids(tok, "What is 1 + 1?")  # the tiny template ignores the tool schema
        assert "<|im_start|>tool\n2\n<|im_end|>" in s.response_text
    assert batch.metrics["rollout/tool_calls"] == 2 and batch.metrics["rollout/reward_mean"] == 1.0
    with pytest.raises(DataError, match="row 0 .* longer than data.max_prompt_len=5"):
        rollout(recs, 1, engine=eng, tokenizer=tok, cfg=RolloutConfig(agent="hermes"), reward="math_verify",
                tool=tool, max_prompt_len=5)
