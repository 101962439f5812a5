"""SPO-tree through the trainer family: tree rollouts on a scripted engine, edge rows, the [B, T] table."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from megatron_spo.config import ConfigError, load_config
from megatron_spo.data import PromptDataset
from megatron_spo.models.tiny import make_tiny_tokenizer
from megatron_spo.rollout.engine import GenerateResult, SamplingParams
from megatron_spo.rollout.phase import RolloutPhase
from megatron_spo.trainer import train_batch as tb
from megatron_spo.trainer.algorithm import Draw
from megatron_spo.trainer.prompt_stream import PromptStream
from megatron_spo.trainer.registry import algorithm_class, build_algorithm
from megatron_spo.trainer.segment_tree import TREE_ADVANTAGE, TREE_EDGE, TREE_FILLER, SegmentTreeStep

# the chain test's scripted engine, reward and prompt helpers (tests/trainer is on sys.path for its tests)
from test_segment_chain_step import GOOD, ScriptedEngine, _prompt, _records, good_token  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


class TreeEngine(ScriptedEngine):
    """The chain test's scripted engine, with a real engine's finish reason: "length" when the entry
    fills ``max_new_tokens`` without eos (a segment cut at its cap), else "stop"."""

    name = "scripted_tree"

    def __init__(self, script, eos: int, fail=()):
        super().__init__(script, fail)
        self.eos = eos

    async def agenerate(self, prompt, sampling: SamplingParams, request_id=None) -> GenerateResult:
        res = await super().agenerate(prompt, sampling, request_id)
        assert len(res.token_ids) <= sampling.max_new_tokens, (tuple(prompt), res.token_ids, sampling.max_new_tokens)
        if len(res.token_ids) == sampling.max_new_tokens and res.token_ids[-1] != self.eos:
            res = dataclasses.replace(res, finish_reason="length")
        return res


def _family(overrides, n=2):
    """The spo_tree family over ``n`` prompts: 2-2 trees of 2-token segments, a 16-token response budget."""
    base = ["algo.advantage=spo_tree", "rollout.max_response_len=16", "algo.segment.branching=[2,2]",
            "algo.segment.segment_len=2", "train.updates_per_step=1"]
    cfg = load_config(None, base + list(overrides))
    stream = PromptStream(n, seed=cfg.train.seed)
    return build_algorithm(cfg, PromptDataset(path="mem", records=_records(n)), stream), cfg


def _golden_script(tok):
    """Two 2-2 trees with 2-token segments.

    q0: node 1 = [310, 311] (cut at 2 tokens: expanded), node 2 = [GOOD, eos] (leaf, R = 1);
        node 1's children: node 3 = [GOOD, eos] (R = 1), node 4 = [320, eos] (R = 0).
        V = (0.75, 0.5, 1, 1, 0); rloo edges: 0→1 −0.25, 0→2 +0.25, 1→3 +0.5, 1→4 −0.5.
    q1: two leaves [GOOD, eos] (R = 1): V(root) = 1, both edges 0 and filtered.
    """
    eos = tok.eos_token_id
    pa, pb = _prompt(tok, "q0"), _prompt(tok, "q1")
    script = {
        pa: [([310, 311], [0.5, 0.95]), ([GOOD, eos], [0.6, 0.95])],
        pa + (310, 311): [([GOOD, eos], [0.3, 0.95]), ([320, eos], [0.4, 0.5])],
        pb: [([GOOD, eos], [0.6, 0.95]), ([GOOD, eos], [0.7, 0.95])],
    }
    return script, pa, pb


def _rollout(fam, cfg, tok, engine, n_records=2, max_retries=2):
    draw = Draw(_records(n_records), 2, "single_stream")
    with RolloutPhase(engine, tok, cfg.rollout, reward=good_token, seed=cfg.train.seed,
                      max_retries=max_retries) as phase:
        batch = fam.rollout(phase, draw, uid_prefix="s0-")
    return draw, batch


# Whitening over the trained (p < 0.9) tokens of the signal rows: −0.25, 0.25, 0.5, −0.5, −0.5 (node 4's
# two tokens); mean −0.1, unbiased var (0.0225 + 0.1225 + 0.36 + 0.16 + 0.16) / 4 = 0.20625.
_STD = math.sqrt(0.20625 + 1e-8)
GOLDEN = [[(-0.25 + 0.1) / _STD, 0.0], [(0.25 + 0.1) / _STD, 0.0], [(0.5 + 0.1) / _STD, 0.0],
          [(-0.5 + 0.1) / _STD, (-0.5 + 0.1) / _STD]]
TRAINED = [[1, 0], [1, 0], [1, 0], [1, 1]]


def _check_rows(adv, batch, samples, table, trained):
    assert adv.shape == batch["loss_mask"].shape and adv.dtype == torch.float32
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        assert torch.allclose(adv[i, p:p + r], torch.tensor(table[i], dtype=torch.float32), atol=1e-6), (i, adv[i])
        assert adv[i, :p].abs().sum() == 0 and adv[i, p + r:].abs().sum() == 0
        assert batch["loss_mask"][i, p:p + r].tolist() == trained[i]  # narrowed in place: only p < 0.9 trains


def test_golden_token_advantages_through_the_family(tok):
    fam, cfg = _family([])
    script, pa, pb = _golden_script(tok)
    engine = TreeEngine(script, tok.eos_token_id)
    draw, out = _rollout(fam, cfg, tok, engine)
    rows = out.samples
    # one row per kept edge: query = the parent's full ids, response = the child's segment
    assert [s.meta[TREE_EDGE] for s in rows] == [(0, 1), (0, 2), (1, 3), (1, 4)]
    assert [s.meta[TREE_ADVANTAGE] for s in rows] == [-0.25, 0.25, 0.5, -0.5]
    assert [tuple(s.prompt_ids) for s in rows] == [pa, pa, pa + (310, 311), pa + (310, 311)]
    assert [s.response_ids for s in rows] == [[310, 311], [GOOD, tok.eos_token_id], [GOOD, tok.eos_token_id],
                                              [320, tok.eos_token_id]]
    assert [s.reward for s in rows] == [0.5, 1.0, 1.0, 0.0] and {s.meta["record"] for s in rows} == {0}
    assert not any(s.meta[TREE_FILLER] for s in rows)
    # token-in from the exact prefixes, same sampling; inner segments capped, the last depth to the end
    first = engine.calls[0][1]
    for key, sampling in engine.calls:
        assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.stop_token_ids) == \
            (first.temperature, first.top_p, first.top_k, first.stop_token_ids)
        assert sampling.max_new_tokens == (14 if key == pa + (310, 311) else 2)
    assert sorted(k for k, _ in engine.calls) == sorted([pa] * 2 + [pb] * 2 + [pa + (310, 311)] * 2)
    m = out.metrics
    assert (m["segment/tree_nodes"], m["segment/leaves"], m["segment/edges"]) == (6.0, 5.0, 6.0)
    assert (m["segment/edges_filtered"], m["segment/edges_trained"]) == (2.0, 4.0)
    assert (m["rollout/tokens_generated"], m["segment/continuation_tokens"]) == (8.0, 4.0)
    assert m["segment/continuation_errors"] == 0.0 and m["rollout/samples"] == 5.0
    assert m["rollout/reward_mean"] == pytest.approx(4 / 5)

    batch = tb.collate(rows, pad_id=tok.pad_token_id)
    metrics: Dict[str, float] = {}
    adv = fam.advantages(draw, rows, batch, metrics)
    _check_rows(adv, batch, rows, GOLDEN, TRAINED)
    assert metrics["segment/tokens_trained"] == 5.0 and metrics["segment/tokens_masked"] == 3.0


def test_filler_rows_keep_the_batch_trainable_and_the_statistics_unchanged(tok):
    fam, cfg = _family(["train.updates_per_step=6"])
    script, _, pb = _golden_script(tok)
    draw, out = _rollout(fam, cfg, tok, TreeEngine(script, tok.eos_token_id))
    rows = out.samples
    assert [s.meta[TREE_FILLER] for s in rows] == [False] * 4 + [True] * 2
    assert all(s.meta[TREE_ADVANTAGE] == 0.0 and tuple(s.prompt_ids) == pb for s in rows[4:])
    assert out.metrics["segment/edges_trained"] == 6.0 and out.metrics["segment/edges_filtered"] == 2.0
    batch = tb.collate(rows, pad_id=tok.pad_token_id)
    adv = fam.advantages(draw, rows, batch, {})
    _check_rows(adv, batch, rows, GOLDEN + [[0.0, 0.0]] * 2, TRAINED + [[1, 0]] * 2)


def test_a_row_without_low_probability_tokens_keeps_its_first_token(tok):
    fam, cfg = _family([])
    script, pa, _ = _golden_script(tok)
    script[pa + (310, 311)][1] = ([320, tok.eos_token_id], [0.95, 0.99])  # node 4: nothing below 0.9
    draw, out = _rollout(fam, cfg, tok, TreeEngine(script, tok.eos_token_id))
    batch = tb.collate(out.samples, pad_id=tok.pad_token_id)
    metrics: Dict[str, float] = {}
    adv = fam.advantages(draw, out.samples, batch, metrics)
    # statistics over −0.25, 0.25, 0.5: mean 1/6, unbiased var (0.1736 + 0.0069 + 0.1111) / 2
    values = [-0.25, 0.25, 0.5]
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2 + 1e-8)
    table = [[(v - mean) / std, 0.0] for v in values] + [[0.0, 0.0]]
    _check_rows(adv, batch, out.samples, table, [[1, 0], [1, 0], [1, 0], [1, 0]])
    assert metrics["segment/tokens_trained"] == 4.0 and metrics["segment/tokens_masked"] == 4.0


def test_grpo_variant_divides_by_the_siblings_std(tok):
    fam, cfg = _family(["algo.segment.tree_advantage=grpo"])
    script, _, _ = _golden_script(tok)
    _, out = _rollout(fam, cfg, tok, TreeEngine(script, tok.eos_token_id))
    # root's children V = (0.5, 1): population std 0.25; node 1's children V = (1, 0): std 0.5
    expect = [-0.25 / (0.25 + 1e-8), 0.25 / (0.25 + 1e-8), 0.5 / (0.5 + 1e-8), -0.5 / (0.5 + 1e-8)]
    assert [s.meta[TREE_ADVANTAGE] for s in out.samples] == pytest.approx(expect)


def test_a_node_whose_children_all_failed_is_graded_as_a_leaf(tok):
    fam, cfg = _family([])
    script, pa, _ = _golden_script(tok)
    engine = TreeEngine(script, tok.eos_token_id, fail=[pa + (310, 311)])
    _, out = _rollout(fam, cfg, tok, engine, max_retries=0)
    # node 1 ([310, 311], no GOOD) gets R = 0: V(root) = 0.5, edges −0.5 and +0.5; q1 is all filtered
    assert [(s.meta[TREE_EDGE], s.meta[TREE_ADVANTAGE]) for s in out.samples] == [((0, 1), -0.5), ((0, 2), 0.5)]
    assert out.metrics["segment/continuation_errors"] == 2.0 and out.metrics["segment/leaves"] == 4.0


def test_failed_rows_are_zero_and_rows_without_edge_advantages_are_an_error():
    from megatron_spo.rollout.sample import Sample

    fam, _ = _family([])
    bare = Sample(uid="a", request_uid="a", prompt_ids=[1], response_ids=[5], loss_mask=[1],
                  rollout_logprobs=[-2.0], reward=1.0, meta={"record": 0})
    failed = Sample(uid="x", request_uid="x", prompt_ids=[1, 2], meta={"record": 0}).fail("engine down")
    draw = Draw(_records(1), 2, "single_stream")
    adv = fam.advantages(draw, [failed], tb.collate([failed], pad_id=0), {})  # no signal anywhere: zeros
    assert adv.tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="sample a has no edge advantage"):
        fam.advantages(draw, [failed, bare], tb.collate([failed, bare], pad_id=0), {})


def test_draw_follows_the_stream_and_the_family_keeps_no_state():
    fam, cfg = _family(["train.prompts_per_step=2", "algo.segment.branching=[3,2,2]"], n=6)
    draws = [fam.draw({}) for _ in range(2)]
    assert [r.index for d in draws for r in d.records] == PromptStream(6, seed=cfg.train.seed).take(4)
    assert {(d.samples_per_prompt, d.delivery) for d in draws} == {(3, "single_stream")}
    assert algorithm_class(cfg) is SegmentTreeStep and SegmentTreeStep.samples_per_prompt(cfg) == 12
    assert fam.state_dict() == {}


def test_tree_keys_and_the_single_turn_check():
    seg = load_config(None, []).algo.segment
    assert (seg.branching, seg.segment_len, seg.tree_advantage) == ([6, 6, 6], 30, "rloo")
    bad = {"algo.segment.branching=[]": "algo.segment.branching",
           "algo.segment.branching=[6,0]": r"algo.segment.branching\[1\]",
           "algo.segment.segment_len=0": "algo.segment.segment_len",
           "algo.segment.tree_advantage=mean": "algo.segment.tree_advantage",
           "rollout.agent=hermes": "supports only rollout.agent=single_turn, got rollout.agent='hermes'"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            cfg = load_config(None, ["algo.advantage=spo_tree", override])
            SegmentTreeStep.check_config(cfg)
    SegmentTreeStep.check_config(load_config(None, ["algo.advantage=spo_tree"]))


def _demo_command(run_dir: Path) -> List[str]:
    """``megatron-spo demo --algo spo_tree --steps 3`` with a 3-step warm start and one final eval sample."""
    sets = ["train.eval_every=3", "rollout.eval_samples=1", "io.tensorboard=false"]
    entry = "import sys; from megatron_spo.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["demo", "--algo", "spo_tree", "--steps", "3", "--warm-steps", "3", "--run-dir", str(run_dir)]
    return [sys.executable, "-c", entry, *args, *[x for kv in sets for x in ("--set", kv)]]


@pytest.mark.slow
def test_demo_spo_tree_runs(tmp_path):
    """The demo end to end (25-60 s on 2 CPU cores): three steps, every tree metric logged."""
    from megatron_spo.trainer.metrics_log import read_metrics

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(_demo_command(tmp_path / "demo"), capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r for r in read_metrics(tmp_path / "demo" / "train" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    tree_keys = ("segment/tree_nodes", "segment/leaves", "segment/edges", "segment/edges_filtered",
                 "segment/edges_trained", "segment/continuation_tokens", "segment/tokens_trained")
    for r in steps:
        assert math.isfinite(r["loss"]) and all(k in r for k in tree_keys + ("segment/tokens_masked",))
        assert r["segment/edges_trained"] >= 1 and r["segment/edges"] >= r["segment/edges_filtered"]
        assert r["rollout/samples"] == r["segment/leaves"] and r["segment/continuation_tokens"] > 0
