"""The SegPO recipes in examples/ (the paper's short-CoT chain and long-CoT tree settings) load and hold its numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_spo.commands.preflight import check_launch_env
from megatron_spo.config import load_config
from megatron_spo.trainer.registry import algorithm_class

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SEGMENT_RECIPES = ["rho_math_1b_spo_chain.yaml", "qwen3_1p7b_spo_tree.yaml"]


@pytest.mark.parametrize("name", SEGMENT_RECIPES)
def test_recipe_loads_validates_and_is_listed(name):
    cfg = load_config(EXAMPLES / name, ['rollout.urls=["http://10.0.0.1:30000"]', "io.run_dir=/shared/runs/x"])
    algorithm_class(cfg).check_config(cfg)
    env = {"WORLD_SIZE": "8", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert all(c.ok for c in check_launch_env(cfg, env))
    assert f"`{name}`" in (EXAMPLES / "README.md").read_text()
    m = cfg.model
    assert (m.recompute, m.recompute_method, m.recompute_num_layers) == ("full", "uniform", 1)
    loss = cfg.algo.loss
    assert (loss.clip_low, loss.clip_high, loss.dual_clip, loss.kl_coef, loss.kl_estimator) == (0.2, 0.2, None, 1e-4, "k3")
    assert cfg.optim.lr == 1e-6 and cfg.optim.clip_grad == 1.0 and cfg.rollout.agent == "single_turn"


def test_short_cot_chain_numbers():
    cfg = load_config(EXAMPLES / "rho_math_1b_spo_chain.yaml")
    seg = cfg.algo.segment
    assert cfg.algo.advantage == "spo_chain"
    assert (seg.prob_threshold, seg.cutpoint_interval, seg.mc_rollouts) == (0.9, 5, 9)
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_response_len) == (0.6, 0.9, 1024)
    assert cfg.train.prompts_per_step == 512 and cfg.train.prompts_per_step // cfg.train.updates_per_step == 64
    assert cfg.optim.warmup_steps == round(0.03 * cfg.train.steps * cfg.train.updates_per_step)


def test_long_cot_tree_numbers():
    cfg = load_config(EXAMPLES / "qwen3_1p7b_spo_tree.yaml")
    seg = cfg.algo.segment
    assert cfg.algo.advantage == "spo_tree"
    assert (seg.branching, seg.segment_len, seg.tree_advantage) == ([6, 6, 6], 600, "rloo")
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_response_len) == (0.6, 1.0, 2048)
    assert cfg.train.prompts_per_step == 32
    assert cfg.model.max_seq_len == cfg.data.max_prompt_len + cfg.rollout.max_response_len
