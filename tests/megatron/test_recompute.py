"""Activation recompute changes memory and compute, not the numbers.

Each setting trains one clipped SGD step on the same HF weights and batch as the run without recompute,
at the same layout, and must give the same loss, gradients and parameters. Forward hooks count how
often a layer, its core attention and its MLP (the experts of a MoE layer) run, which shows that the recompute really happened: full
recompute runs every layer twice per micro-batch, selective core_attn only the attention.
"""

from __future__ import annotations

import pytest

from megatron_spo.megatron.launch import run_distributed
from megatron_spo.megatron.model import recompute_overrides
from megatron_spo.megatron.parallel import ParallelSizes

SETTINGS = {
    "full_uniform": recompute_overrides("full", "uniform", 1),
    "full_block": recompute_overrides("full", "block", 1),
    "selective_attn": recompute_overrides("selective", modules=["core_attn"]),
    "selective_mlp": recompute_overrides("selective", modules=["mlp"]),
}
MOE_SETTINGS = {
    "full_uniform": recompute_overrides("full", "uniform", 1),
    "selective_moe": recompute_overrides("selective", modules=["moe"]),
}


def _step(hf_dir, sizes, overrides):
    """One score + forward-backward + clipped SGD step; returns loss, full grads/params and call counts."""
    from megatron.core import parallel_state as ps
    from test_actor_parallel import CLIP, LR, _full, _grads_as_params, make_batch

    from megatron_spo.megatron.actor import LossSettings, MegatronActor
    from megatron_spo.megatron.batching import shard_for_data_parallel
    from megatron_spo.megatron.export import load_hf_weights
    from megatron_spo.megatron.model import load_hf_config
    from megatron_spo.megatron.optimizer import OptimSettings
    from megatron_spo.megatron.parallel import initialize_parallel, teardown_parallel

    cfg = load_hf_config(hf_dir)
    dp = initialize_parallel(sizes, hf_config=cfg, seed=7)
    actor = MegatronActor(cfg, optim=OptimSettings(lr=LR, clip_grad=CLIP, optimizer="sgd"),
                          loss=LossSettings(name="ppo"), micro_batch_tokens=40, **overrides)
    load_hf_weights(actor.model, hf_dir)
    layer = actor.model[0].module.decoder.layers[0]
    calls = {"layer": 0, "attn": 0, "mlp": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1
        return hook

    layer.register_forward_hook(count("layer"))
    layer.self_attention.core_attention.register_forward_hook(count("attn"))
    # MoE: megatron's "moe" recompute checkpoints router, dispatch and experts inside MoELayer.forward.
    getattr(layer.mlp, "experts", layer.mlp).register_forward_hook(count("mlp"))
    batch = shard_for_data_parallel(make_batch(), ps.get_data_parallel_rank(), dp)
    metrics = actor.forward_backward(batch)
    with _grads_as_params(actor):
        grads = _full(actor, hf_dir)
    actor.optimizer_step()
    params = _full(actor, hf_dir)
    micro_batches = len(actor.micro_batches(batch))
    teardown_parallel(destroy_process_group=False)
    return {"loss": float(metrics["loss"]), "grads": grads, "params": params, "calls": calls,
            "micro_batches": micro_batches}


def _worker(dirs, layouts):
    out = {}
    for family, sizes, settings in layouts:
        out[(family, str(sizes), "none")] = _step(dirs[family], sizes, {})
        for name, overrides in settings.items():
            out[(family, str(sizes), name)] = _step(dirs[family], sizes, overrides)
    return out


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from megatron_spo.models.tiny import make_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny")
    dirs = {f: str(make_tiny_model_dir(root / f, f, seed=3, tokenizer=False)) for f in ("qwen3", "qwen3_moe")}
    single = run_distributed(_worker, 1, args=(dirs, [("qwen3", ParallelSizes(), SETTINGS),
                                                      ("qwen3_moe", ParallelSizes(), MOE_SETTINGS)]), timeout=600)[0]
    two = {"full_block": SETTINGS["full_block"], "full_uniform": SETTINGS["full_uniform"]}
    par = run_distributed(_worker, 2, args=(dirs, [("qwen3", ParallelSizes(pp=2), two),
                                                   ("qwen3", ParallelSizes(tp=2), two)]), timeout=600)[0]
    return {**single, **par}


def test_recompute_gives_the_same_step(results):
    checked = 0
    for (family, sizes, name), res in results.items():
        if name == "none":
            continue
        ref = results[(family, sizes, "none")]
        assert res["loss"] == pytest.approx(ref["loss"], abs=1e-6), (family, sizes, name)
        assert _max_diff(res["grads"], ref["grads"]) <= 1e-6, (family, sizes, name)
        assert _max_diff(res["params"], ref["params"]) <= 1e-6, (family, sizes, name)
        checked += 1
    assert checked == len(SETTINGS) + len(MOE_SETTINGS) + 4


def test_recompute_really_reruns_the_forward(results):
    for (family, sizes, name), res in results.items():
        base = results[(family, sizes, "none")]["calls"]
        n = res["micro_batches"]
        assert base == {"layer": n, "attn": n, "mlp": n}, (family, sizes, base)
        calls = res["calls"]
        if name.startswith("full"):  # the whole first layer runs again in the backward
            assert calls == {"layer": 2 * n, "attn": 2 * n, "mlp": 2 * n}, (family, sizes, name, calls)
        elif name == "selective_attn":  # only core attention
            assert calls == {"layer": n, "attn": 2 * n, "mlp": n}, (family, sizes, name, calls)
        elif name in ("selective_mlp", "selective_moe"):  # only the MLP / MoE block
            assert calls == {"layer": n, "attn": n, "mlp": 2 * n}, (family, sizes, name, calls)


@pytest.mark.parametrize("args, pattern", [
    (("full", "diagonal", 1), "method 'uniform' or 'block'"),
    (("full", "uniform", 0), "num_layers >= 1"),
    (("selective", "uniform", 1, ()), "at least one module"),
    (("sometimes",), "recompute='sometimes'"),
])
def test_bad_recompute_settings_are_named(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        recompute_overrides(*args)


def test_no_recompute_adds_nothing():
    assert recompute_overrides("none") == {}
