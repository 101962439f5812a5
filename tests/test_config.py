"""Config tree: YAML + dotted overrides, type and range validation, saving, the `config` sub-command."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from megatron_spo.cli import main
from megatron_spo.config import ConfigError, describe, load_config


def test_defaults_follow_the_spo_reference():
    cfg = load_config()
    assert cfg.algo.advantage == "spo"
    assert (cfg.algo.spo.rho_min, cfg.algo.spo.rho_max, cfg.algo.spo.d_half) == (0.875, 0.96, 0.06)
    assert (cfg.algo.loss.clip_low, cfg.algo.loss.clip_high, cfg.algo.loss.dual_clip) == (0.2, 0.28, 10.0)
    assert cfg.algo.loss.agg == "token-mean" and cfg.algo.loss.kl_coef == 0.0
    assert cfg.optim.lr == 1e-6 and cfg.optim.clip_grad == 1.0


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"algo": {"spo": {"rho_min": 0.8}}, "train": {"steps": 7}}))
    cfg = load_config(path, ["optim.min_lr=1e-7", "algo.spo.rho_min=0.9", "rollout.urls=[http://a:1, http://b:2]",
                             "rollout.engine=sglang", "algo.loss.dual_clip=null", "optim.lr=3"])
    assert cfg.algo.spo.rho_min == 0.9
    assert cfg.train.steps == 7
    assert cfg.rollout.urls == ["http://a:1", "http://b:2"]
    assert cfg.algo.loss.dual_clip is None
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == 1e-7  # YAML 1.1 reads 1e-7 as text; numeric text is accepted


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.spo.rho_mn=0.9", "unknown config key 'algo.spo.rho_mn'; did you mean rho_min"),
        ("algo.loss.name=foo", "algo.loss.name must be one of 'ppo', 'gspo', 'vespo'; got 'foo'"),
        ("optim.lr=-1", "optim.lr must be in (0.0, inf), got -1.0"),
        ("algo.spo.rho_min=1.5", "algo.spo.rho_min must be in (0.0, 1.0], got 1.5"),
        ("algo.spo.rho_min=0.99", "algo.spo.rho_min (0.99) must not exceed algo.spo.rho_max (0.96)"),
        ("train.steps=2.5", "train.steps must be an integer, got 2.5"),
        ("train.steps=true", "train.steps must be an integer, got True"),
        ("io.tensorboard=1", "io.tensorboard must be true or false, got 1"),
        ("rollout.urls=http://x", "rollout.urls must be a list"),
        ("optim.lr=.nan", "optim.lr must be finite"),
        ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
        ("train=3", "train must be a mapping of keys"),
        ("rollout.engine=vllm", "rollout.engine=vllm needs rollout.urls or rollout.ray_servers > 0"),
        ("parallel.sequence_parallel=true", "parallel.sequence_parallel needs parallel.tensor > 1"),
        ("trainsteps", "must look like section.key=value"),
        ("model.recompute=always", "model.recompute must be one of 'none', 'full', 'selective'; got 'always'"),
        ("model.recompute_num_layers=0", "model.recompute_num_layers must be"),
        ("model.recompute_modules=[core_attn,attention]", "model.recompute_modules: unknown ['attention']"),
        ("optim.offload_fraction=0", "optim.offload_fraction must be in (0.0, 1.0], got 0"),
        ("optim.moments_dtype=float16", "optim.moments_dtype must be one of 'float32', 'bfloat16'"),
        ("optim.cpu_offload=true", "optim.cpu_offload needs parallel.distributed_optimizer=true"),
        ("optim.moments_dtype=bfloat16", "optim.moments_dtype=bfloat16 needs parallel.distributed_optimizer=true"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_memory_settings_reach_megatron():
    """The recompute and optimizer keys become the megatron config fields the GPU recipes need."""
    from megatron_spo.megatron.model import recompute_overrides
    from megatron_spo.megatron.optimizer import OptimSettings, optimizer_config_kwargs

    with pytest.raises(ConfigError, match="model.recompute=selective needs at least one"):
        load_config(overrides=["model.recompute=selective", "model.recompute_modules=[]"])
    cfg = load_config(overrides=["model.recompute=full", "model.recompute_method=block",
                                 "model.recompute_num_layers=2", "optim.cpu_offload=true",
                                 "optim.offload_fraction=0.5", "parallel.distributed_optimizer=true"])
    m = cfg.model
    assert recompute_overrides(m.recompute, m.recompute_method, m.recompute_num_layers, m.recompute_modules) == {
        "recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}
    kw = optimizer_config_kwargs(OptimSettings.from_config(cfg.optim, 10, distributed_optimizer=True),
                                 params_dtype=torch.bfloat16)
    assert (kw["optimizer_cpu_offload"], kw["optimizer_offload_fraction"], kw["use_precision_aware_optimizer"],
            kw["use_distributed_optimizer"], kw["overlap_cpu_optimizer_d2h_h2d"]) == (True, 0.5, True, True, True)
    default = optimizer_config_kwargs(OptimSettings.from_config(load_config().optim, 10), params_dtype=torch.float32)
    assert (default["optimizer_cpu_offload"], default["optimizer_offload_fraction"],
            default["use_precision_aware_optimizer"]) == (False, 0.0, False)
    with pytest.raises(ValueError, match="need the distributed optimizer with adam"):
        optimizer_config_kwargs(OptimSettings(cpu_offload=True), params_dtype=torch.float32)


def test_moe_with_tensor_parallel_needs_sequence_parallel():
    with pytest.raises(ConfigError, match="needs parallel.sequence_parallel=true"):
        load_config(overrides=["parallel.tensor=2", "parallel.expert=2"])
    cfg = load_config(overrides=["parallel.tensor=2", "parallel.expert=2", "parallel.sequence_parallel=true"])
    assert cfg.parallel.sequence_parallel


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(top)


def test_save_round_trips(tmp_path):
    cfg = load_config(overrides=["algo.advantage=grpo", "algo.grpo.n=4", "data.eval_paths=[a.jsonl]"])
    yaml_path, json_path = cfg.save(tmp_path / "run")
    again = load_config(yaml_path)
    assert again == cfg
    assert json.loads(json_path.read_text()) == cfg.to_dict()


def test_loss_names_match_the_registry():
    import typing

    import megatron_spo.algos as algos
    from megatron_spo.config import AlgoConfig, LossConfig

    loss_names = set(typing.get_args(typing.get_type_hints(LossConfig)["name"]))
    adv_names = set(typing.get_args(typing.get_type_hints(AlgoConfig)["advantage"]))
    assert loss_names <= set(algos.POLICY_LOSSES), sorted(algos.POLICY_LOSSES)
    # spo_chain and spo_tree are trainer families (token-level advantages from continuations), not reward estimators
    assert adv_names - {"spo_chain", "spo_tree"} <= set(algos.ADVANTAGE_ESTIMATORS), sorted(algos.ADVANTAGE_ESTIMATORS)


def test_cli_show_and_keys(tmp_path, capsys):
    assert main(["config", "show", "--set", "train.steps=3", "--save", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and (tmp_path / "config.json").is_file()
    assert main(["config", "show", "--set", "train.stepz=3"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().out
    assert main(["config", "keys"]) == 0
    keys = capsys.readouterr().out
    assert "algo.spo.rho_min: float = 0.875" in keys
    assert "algo.loss.name: 'ppo' | 'gspo' | 'vespo' = 'ppo'" in keys
    assert len(keys.splitlines()) == len(describe().splitlines())
