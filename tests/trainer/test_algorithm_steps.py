"""The algorithm-step families through their interface: draw, advantages, state, registry, loop shape."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from megatron_spo.config import ConfigError, load_config
from megatron_spo.data import PromptDataset, PromptRecord
from megatron_spo.rollout.sample import Sample
from megatron_spo.trainer import train_batch as tb
from megatron_spo.trainer.algorithm import Draw, UpdateOutcome
from megatron_spo.trainer.group import GroupStep
from megatron_spo.trainer.prompt_stream import PromptStream
from megatron_spo.trainer.registry import ALGORITHMS, algorithm_class, build_algorithm
from megatron_spo.trainer.segment_chain import SegmentChainStep
from megatron_spo.trainer.segment_tree import SegmentTreeStep
from megatron_spo.trainer.spo import SPOStep

TRAINER = Path(__file__).resolve().parents[2] / "megatron_spo" / "trainer"


def _dataset(n: int) -> PromptDataset:
    recs = [PromptRecord(index=i, messages=[{"role": "user", "content": f"q{i}"}], answer=str(i), key=f"q{i}")
            for i in range(n)]
    return PromptDataset(path="mem", records=recs)


def _family(overrides, n=6):
    cfg = load_config(None, overrides)
    data = _dataset(n)
    return build_algorithm(cfg, data, PromptStream(len(data), seed=cfg.train.seed)), cfg


def _sample(uid, reward, record, ok=True, resp=(2, 3)):
    s = Sample(uid=uid, request_uid=uid, prompt_ids=[1], response_ids=list(resp), loss_mask=[1] * len(resp),
               rollout_logprobs=[-1.0] * len(resp), reward=reward, meta={"record": record})
    return s if ok else s.fail("engine down")


def test_registry_maps_every_advantage_name_to_one_family():
    assert ALGORITHMS == {"spo": SPOStep, "grpo": GroupStep, "dr_grpo": GroupStep, "rloo": GroupStep,
                          "spo_chain": SegmentChainStep, "spo_tree": SegmentTreeStep}
    cfg = load_config(None, ["algo.advantage=rloo"])
    assert algorithm_class(cfg) is GroupStep and GroupStep.samples_per_prompt(cfg) == cfg.algo.grpo.n
    cfg.algo.advantage = "ppo"  # what a config that bypassed validation would hold
    with pytest.raises(ConfigError, match="algo.advantage='ppo' has no trainer step"):
        algorithm_class(cfg)


def test_spo_draw_carries_the_baseline_read_at_draw_time():
    fam, _ = _family(["algo.advantage=spo", "train.prompts_per_step=3", "algo.spo.pool_size=4"])
    fam.tracker.update(["q0"], torch.tensor([1.0]), torch.tensor([1.0]))  # v(q0) = 1.5 / 2 = 0.75
    metrics = {}
    draw = fam.draw(metrics)
    assert draw.samples_per_prompt == 1 and draw.delivery == "single_stream" and len(draw.records) == 3
    expected = fam.tracker.values([r.key for r in draw.records])
    assert torch.equal(draw.baselines, expected)
    assert metrics["sampler/pool_size"] == 4.0 and metrics["sampler/picked_value_mean"] == float(expected.mean())
    # the tracker moving after the draw does not change this draw's baselines (streaming reads them late)
    fam.tracker.update([r.key for r in draw.records], torch.ones(3), torch.ones(3, dtype=torch.float64))
    assert torch.equal(draw.baselines, expected)


def test_spo_advantages_skip_failed_samples_and_normalise_globally():
    fam, _ = _family(["algo.advantage=spo"])
    recs = _dataset(4).records
    draw = Draw(recs, 1, "single_stream", baselines=torch.tensor([0.5, 0.5, 0.5, 0.25], dtype=torch.float64))
    samples = [_sample("a", 1.0, 0), _sample("b", 0.0, 1), _sample("c", 1.0, 2), _sample("x", None, 3, ok=False)]
    batch = tb.collate(samples, pad_id=0)
    metrics = {}
    adv = fam.advantages(draw, samples, batch, metrics)
    # independent: a = r - 0.5 over the 3 good ones = [.5, -.5, .5]; mean 1/6; unbiased std sqrt(1/3)
    a = torch.tensor([0.5, -0.5, 0.5], dtype=torch.float64)
    expected = ((a - a.mean()) / (a.std() + 1e-8)).float()
    assert adv.shape == batch["loss_mask"].shape and adv.dtype == torch.float32
    assert torch.allclose(adv[0], torch.tensor([0, expected[0], expected[0]]))
    assert torch.allclose(adv[1], torch.tensor([0, expected[1], expected[1]]))
    assert adv[3].abs().sum() == 0
    assert metrics["spo/baseline_mean"] == pytest.approx((0.5 * 3 + 0.25) / 4)


def test_group_advantages_use_each_prompts_samples_as_a_group():
    rewards = [1.0, 0.0, 1.0, 1.0]
    samples = [_sample(f"s{i}", r, i // 2, resp=(2,)) for i, r in enumerate(rewards)]
    batch = tb.collate(samples, pad_id=0)
    draw = Draw(_dataset(2).records, 2, "group")
    s = torch.tensor([1.0, 0.0]).std()
    grpo, _ = _family(["algo.advantage=grpo", "algo.grpo.n=2"])
    got = grpo.advantages(draw, samples, batch, {})[:, 1]
    assert torch.allclose(got, torch.tensor([0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.0, 0.0]))
    dr, _ = _family(["algo.advantage=dr_grpo", "algo.grpo.n=2"])
    assert torch.allclose(dr.advantages(draw, samples, batch, {})[:, 1], torch.tensor([0.5, -0.5, 0.0, 0.0]))
    rloo, _ = _family(["algo.advantage=rloo", "algo.grpo.n=2"])
    # leave-one-out: r_i - r_other
    assert torch.allclose(rloo.advantages(draw, samples, batch, {})[:, 1], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    # a group that lost a sample to an error: the survivor has no leave-one-out baseline -> 0
    broken = [samples[0], _sample("x", None, 0, ok=False, resp=(2,))] + samples[2:]
    assert rloo.advantages(draw, broken, tb.collate(broken, pad_id=0), {})[:, 1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_group_draw_takes_the_next_prompts_of_the_stream():
    fam, cfg = _family(["algo.advantage=grpo", "algo.grpo.n=4", "train.prompts_per_step=2"])
    order = PromptStream(6, seed=cfg.train.seed).take(4)
    first, second = fam.draw({}), fam.draw({})
    assert [r.index for r in first.records + second.records] == order
    assert first.samples_per_prompt == 4 and first.delivery == "group" and first.baselines is None
    assert fam.state_dict() == {}


def test_spo_after_update_accumulated_rho_and_state_round_trip():
    over = ["algo.advantage=spo", "algo.spo.rho_mode=accumulated", "train.updates_per_step=2"]
    fam, _ = _family(over)
    samples = [_sample("a", 1.0, 0), _sample("x", None, 1, ok=False)]
    samples[0].key, samples[1].key = "q0", "q1"
    metrics = {}
    fam.after_update(None, UpdateOutcome(samples, {}, [0, 1], [0.0, 0.01], pad_id=0), metrics)
    alpha_beta = fam.tracker.state_dict()
    assert fam.tracker.ledger == pytest.approx(0.02) and metrics["spo/update_batch"] == 1.0
    assert float(fam.tracker.values(["q1"])[0]) == 0.5  # the failed sample does not update its prompt
    again, _ = _family(over)
    again.load_state_dict(fam.state_dict())
    assert torch.equal(again.tracker.values(["q0", "q1"]), fam.tracker.values(["q0", "q1"]))
    assert sorted(fam.state_dict()) == ["sampler", "tracker"] and alpha_beta["keys"] == again.tracker.state_dict()["keys"]


def test_check_config_is_the_familys():
    with pytest.raises(ConfigError, match="rho_mode=accumulated needs train.updates_per_step >= 2"):
        SPOStep.check_config(load_config(None, ["algo.spo.rho_mode=accumulated", "train.updates_per_step=1"]))
    GroupStep.check_config(load_config(None, ["algo.advantage=grpo", "train.updates_per_step=1"]))


def test_the_loop_has_no_algorithm_name_branch():
    """No trainer file outside the families and the registry reads ``algo.advantage`` or an SPO-only part."""
    families = {"spo.py", "group.py", "registry.py", "segment_tree.py"}  # segment_tree reads Edge.advantage
    for path in sorted(TRAINER.glob("*.py")):
        if path.name in families:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("advantage", "tracker", "sampler"), f"{path.name}:{node.lineno} reads .{node.attr}"


def test_config_choices_are_exactly_the_registered_families():
    import typing

    from megatron_spo.config.algo_schema import AlgoConfig

    hints = typing.get_type_hints(AlgoConfig)
    assert set(typing.get_args(hints["advantage"])) == set(ALGORITHMS)


def test_a_missing_resume_path_fails_before_anything_is_built(tmp_path, monkeypatch):
    from megatron_spo.checkpoint_dir import NoCheckpointError
    from megatron_spo.trainer import loop

    def no_setup(cfg):
        raise AssertionError("setup ran before the resume path was checked")

    monkeypatch.setattr(loop, "setup", no_setup)
    cfg = load_config(None, [f"io.resume={tmp_path / 'nope'}", f"io.run_dir={tmp_path / 'run'}"])
    with pytest.raises(NoCheckpointError, match="does not exist"):
        loop.train(cfg)
