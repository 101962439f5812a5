"""SPO-chain through the trainer family: cut points, continuations on a scripted engine, the [B, T] table."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from megatron_spo.config import ConfigError, load_config
from megatron_spo.data import PromptDataset, PromptRecord
from megatron_spo.models.tiny import make_tiny_tokenizer
from megatron_spo.rollout.engine import EngineError, GenerateResult, SamplingParams
from megatron_spo.rollout.phase import RolloutPhase
from megatron_spo.rollout.sample import Sample
from megatron_spo.trainer import train_batch as tb
from megatron_spo.trainer.algorithm import Draw
from megatron_spo.trainer.prompt_stream import PromptStream
from megatron_spo.trainer.registry import algorithm_class, build_algorithm
from megatron_spo.trainer.segment_chain import SEGMENT_CUTS, SEGMENT_VALUES, SegmentChainStep

ROOT = Path(__file__).resolve().parents[2]
GOOD = 300  # the reward is 1 when the response holds this token


def good_token(response, ground_truth, sample=None, **kw):
    return float(GOOD in sample.response_ids)


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


class ScriptedEngine:
    """Answers each exact token prompt from a script: the first call on a prompt gets its first entry,
    the next call the second, and so on (the phase's responses come before any continuation).

    A script entry is ``(token ids, probabilities)``; the log-probs returned are ``log(p)``.
    """

    name = "scripted_chain"
    weight_version = 0

    def __init__(self, script: Dict[Tuple[int, ...], List[Tuple[List[int], List[float]]]], fail=()):
        self.script = {k: list(v) for k, v in script.items()}
        self.fail = {tuple(f) for f in fail}
        self.calls: List[Tuple[Tuple[int, ...], SamplingParams]] = []

    async def agenerate(self, prompt, sampling: SamplingParams, request_id=None) -> GenerateResult:
        key = tuple(prompt)
        self.calls.append((key, sampling))
        await asyncio.sleep(0)
        if key in self.fail:
            raise EngineError("scripted failure")
        ids, probs = self.script[key].pop(0)
        return GenerateResult(list(ids), [math.log(p) for p in probs], "stop", 0, len(prompt))


def _records(n: int) -> List[PromptRecord]:
    return [PromptRecord(index=i, messages=[{"role": "user", "content": f"q{i}"}], answer=str(i), key=f"q{i}")
            for i in range(n)]


def _family(overrides, n=2):
    cfg = load_config(None, ["algo.advantage=spo_chain", "rollout.max_response_len=16"] + list(overrides))
    data = PromptDataset(path="mem", records=_records(n))
    return build_algorithm(cfg, data, PromptStream(n, seed=cfg.train.seed)), cfg


def _prompt(tok, text: str) -> Tuple[int, ...]:
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tuple(tok.encode(rendered, add_special_tokens=False))


def _golden_script(tok):
    """Response A (q0, reward 0) and B (q1, reward 1) and the continuations of their prefixes.

    A: p = [.95, .5, .95, .4, .3, .95]: low tokens 1, 3, 4; interval 2 keeps 1 and 4 -> cuts 0 and 3.
       V(cut 0) = mean(1, 0) = 0.5, V(cut 3) = mean(1, 1) = 1.0.
    B: p = [.2, .95, .6, .99]: low tokens 0, 2; interval 2 keeps 0 -> cut −1 (the prompt): V(prompt) = 0.5.
    """
    eos = tok.eos_token_id
    pa, pb = _prompt(tok, "q0"), _prompt(tok, "q1")
    a = [310, 311, 312, 313, 314, eos]
    b = [GOOD, 321, 322, eos]
    script = {
        pa: [(a, [0.95, 0.5, 0.95, 0.4, 0.3, 0.95])],
        pa + (a[0],): [([GOOD, eos], [0.5, 0.9]), ([330, eos], [0.5, 0.9])],
        pa + tuple(a[:4]): [([GOOD, eos], [0.5, 0.9]), ([331, GOOD, eos], [0.5, 0.5, 0.9])],
        pb: [(b, [0.2, 0.95, 0.6, 0.99]), ([GOOD, eos], [0.5, 0.9]), ([340, 341, eos], [0.5, 0.5, 0.9])],
    }
    return script, pa, pb, a, b


def _rollout(fam, cfg, tok, engine, n_records=2):
    draw = Draw(_records(n_records), 1, "single_stream")
    with RolloutPhase(engine, tok, cfg.rollout, reward=good_token, seed=cfg.train.seed) as phase:
        batch = fam.rollout(phase, draw, uid_prefix="s0-")
    return draw, batch


def test_golden_token_advantages_through_the_family(tok):
    fam, cfg = _family(["algo.segment.cutpoint_interval=2", "algo.segment.mc_rollouts=2",
                        "algo.segment.prob_threshold=0.9"])
    script, pa, pb, a, b = _golden_script(tok)
    engine = ScriptedEngine(script)
    draw, out = _rollout(fam, cfg, tok, engine)
    sa, sb = out.samples
    assert (sa.reward, sb.reward) == (0.0, 1.0)
    assert sa.meta[SEGMENT_CUTS] == [0, 3] and sa.meta[SEGMENT_VALUES] == [0.5, 1.0]
    assert sb.meta[SEGMENT_CUTS] == [-1] and sb.meta[SEGMENT_VALUES] == [0.5]
    # token-in continuations from the exact prefixes, with the responses' sampling settings
    first = {k: s for k, s in engine.calls[:2]}
    conts = engine.calls[2:]
    assert sorted(k for k, _ in conts) == sorted([pa + (a[0],)] * 2 + [pa + tuple(a[:4])] * 2 + [pb] * 2)
    for key, sampling in conts:
        main = first[pa if key[:len(pa)] == pa else pb]
        assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.stop_token_ids) == \
            (main.temperature, main.top_p, main.top_k, main.stop_token_ids)
        prompt_len = len(pa) if key[:len(pa)] == pa else len(pb)
        assert sampling.max_new_tokens == 16 - (len(key) - prompt_len)  # the response budget, from its start
    m = out.metrics
    assert m["segment/cutpoints_per_response"] == 1.5 and m["segment/segments"] == 4.0  # A: 3, B: 1
    assert m["segment/prefix_queries"] == 3.0 and m["segment/continuations"] == 6.0
    assert m["segment/continuation_tokens"] == 2 + 2 + 2 + 3 + 2 + 3 and m["segment/continuation_errors"] == 0.0
    assert m["rollout/samples"] == 2.0

    batch = tb.collate(out.samples, pad_id=tok.pad_token_id)
    metrics: Dict[str, float] = {}
    adv = fam.advantages(draw, out.samples, batch, metrics)
    # Hand computation. Segment advantages (first segment 0 without V(prompt)):
    #   A: token 0 -> 0; tokens 1..3 -> V(3) − V(0) = 0.5; tokens 4..5 -> R − V(3) = −1
    #   B: every token -> R − V(prompt) = 0.5
    # Probability mask keeps A's tokens 1, 3, 4 and B's 0, 2: values 0.5, 0.5, −1, 0.5, 0.5;
    # mean 0.2, unbiased var (4·0.09 + 1.44) / 4 = 0.45; whitened (A − 0.2) / sqrt(0.45 + 1e-8).
    hi, lo = 0.3 / math.sqrt(0.45 + 1e-8), -1.2 / math.sqrt(0.45 + 1e-8)
    table = {0: [0.0, hi, 0.0, hi, lo, 0.0], 1: [hi, 0.0, hi, 0.0]}
    trained = {0: [0, 1, 0, 1, 1, 0], 1: [1, 0, 1, 0]}
    assert adv.shape == batch["loss_mask"].shape and adv.dtype == torch.float32
    for i, s in enumerate(out.samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        assert torch.allclose(adv[i, p:p + r], torch.tensor(table[i]), atol=1e-6), (i, adv[i, p:p + r])
        assert adv[i, :p].abs().sum() == 0 and adv[i, p + r:].abs().sum() == 0
        assert batch["loss_mask"][i, p:p + r].tolist() == trained[i]  # narrowed in place: only p < 0.9 trains
    assert metrics["segment/tokens_masked"] == 5.0 and metrics["segment/tokens_trained"] == 5.0


def test_shared_prefixes_are_continued_once_and_failures_drop_their_cut(tok):
    fam, cfg = _family(["algo.segment.cutpoint_interval=1", "algo.segment.mc_rollouts=2"], n=2)
    eos = tok.eos_token_id
    p = _prompt(tok, "q0")
    resp = [400, 401, eos]  # p: low at 1 and 2 -> cuts 0 and 1
    script = {p: [(resp, [0.95, 0.5, 0.5]), (resp, [0.95, 0.5, 0.5])],
              p + (400,): [([GOOD, eos], [0.5, 0.5]), ([GOOD, eos], [0.5, 0.5])]}
    engine = ScriptedEngine(script, fail=[p + (400, 401)])
    records = [_records(1)[0]] * 2  # the same prompt drawn twice: identical prefixes
    with RolloutPhase(engine, tok, cfg.rollout, reward=good_token, seed=cfg.train.seed, max_retries=0) as phase:
        out = fam.rollout(phase, Draw(records, 1, "single_stream"), uid_prefix="s0-")
    assert out.metrics["segment/prefix_queries"] == 2.0 and out.metrics["segment/continuations"] == 4.0
    assert out.metrics["segment/continuation_errors"] == 2.0
    for s in out.samples:  # cut 1's continuations all failed: only cut 0 is valued
        assert s.meta[SEGMENT_CUTS] == [0] and s.meta[SEGMENT_VALUES] == [1.0]


def test_nothing_below_the_threshold_keeps_the_mask_and_gives_zeros(tok):
    fam, _ = _family([])
    s = Sample(uid="a", request_uid="a", prompt_ids=[1], response_ids=[5, 6], loss_mask=[1, 1],
               rollout_logprobs=[-0.01, -0.02], reward=1.0, meta={"record": 0, SEGMENT_CUTS: [], SEGMENT_VALUES: []})
    failed = Sample(uid="x", request_uid="x", prompt_ids=[1], meta={"record": 1}).fail("engine down")
    batch = tb.collate([s, failed], pad_id=0)
    metrics: Dict[str, float] = {}
    adv = fam.advantages(Draw(_records(2), 1, "single_stream"), [s, failed], batch, metrics)
    assert adv.abs().sum() == 0 and batch["loss_mask"][0].tolist() == [0.0, 1.0, 1.0]
    assert metrics["segment/tokens_masked"] == 0.0


def test_a_row_with_nothing_below_the_threshold_keeps_one_token_with_advantage_zero(tok):
    """Another row has low-probability tokens, this one none: it keeps its first trained token (advantage 0),
    so a micro-batch holding only this row still has a token to normalise by."""
    fam, _ = _family([])
    sure = Sample(uid="a", request_uid="a", prompt_ids=[1], response_ids=[5, 6], loss_mask=[1, 1],
                  rollout_logprobs=[-0.01, -0.02], reward=1.0,
                  meta={"record": 0, SEGMENT_CUTS: [], SEGMENT_VALUES: []})
    unsure = Sample(uid="b", request_uid="b", prompt_ids=[1], response_ids=[7, 8], loss_mask=[1, 1],
                    rollout_logprobs=[-2.0, -3.0], reward=0.0,
                    meta={"record": 1, SEGMENT_CUTS: [0], SEGMENT_VALUES: [0.5]})
    batch = tb.collate([sure, unsure], pad_id=0)
    adv = fam.advantages(Draw(_records(2), 1, "single_stream"), [sure, unsure], batch, {})
    assert batch["loss_mask"][0].tolist() == [0.0, 1.0, 0.0]  # the first response token only
    assert adv[0].abs().sum() == 0
    assert batch["loss_mask"][1].tolist() == [0.0, 1.0, 1.0] and adv[1, 1:].abs().sum() > 0


def test_samples_without_segment_values_are_an_error():
    fam, _ = _family([])
    s = Sample(uid="a", request_uid="a", prompt_ids=[1], response_ids=[5], loss_mask=[1], rollout_logprobs=[-2.0],
               reward=1.0, meta={"record": 0})
    with pytest.raises(ValueError, match="sample a has no segment values"):
        fam.advantages(Draw(_records(1), 1, "single_stream"), [s], tb.collate([s], pad_id=0), {})


def test_draw_config_and_registry():
    fam, cfg = _family(["train.prompts_per_step=2"], n=6)
    assert algorithm_class(cfg) is SegmentChainStep and SegmentChainStep.samples_per_prompt(cfg) == 1
    order = PromptStream(6, seed=cfg.train.seed).take(4)
    first, second = fam.draw({}), fam.draw({})
    assert [r.index for r in first.records + second.records] == order
    assert first.samples_per_prompt == 1 and first.delivery == "single_stream" and fam.state_dict() == {}
    SegmentChainStep.check_config(cfg)
    with pytest.raises(ConfigError, match="supports only rollout.agent=single_turn, got rollout.agent='spo_code'"):
        SegmentChainStep.check_config(load_config(None, ["algo.advantage=spo_chain", "rollout.agent=spo_code"]))
    seg = load_config(None, []).algo.segment
    assert (seg.prob_threshold, seg.cutpoint_interval, seg.mc_rollouts) == (0.9, 5, 9)
    for bad in ("algo.segment.prob_threshold=0", "algo.segment.cutpoint_interval=0", "algo.segment.mc_rollouts=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


@pytest.mark.slow
def test_demo_spo_chain_runs(tmp_path):
    """``megatron-spo demo --algo spo_chain --steps 3`` end to end (about 25 s on 2 CPU cores)."""
    from megatron_spo.trainer.metrics_log import read_metrics

    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-c", "import sys; from megatron_spo.cli import main; sys.exit(main(sys.argv[1:]))",
           "demo", "--algo", "spo_chain", "--steps", "3", "--warm-steps", "3", "--run-dir", str(run_dir),
           "--set", "train.eval_every=3", "--set", "rollout.eval_samples=1", "--set", "io.tensorboard=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [r for r in read_metrics(run_dir / "train" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert math.isfinite(r["loss"]) and r["rollout/samples"] == 16
        assert r["segment/continuations"] == 4 * r["segment/prefix_queries"]
        assert r["segment/continuation_tokens"] > 0 and r["segment/tokens_trained"] > 0
        for key in ("segment/cutpoints_per_response", "segment/segments", "segment/tokens_masked"):
            assert key in r
