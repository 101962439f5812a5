"""Padding-free packing (megatron_spo/megatron/packing.py, packed_forward.py) against the padded path.

Fast: the planner and the packed tensors. Spawned (one process): the packed actor's log-probs (relative to
max(1, |logp|)), loss and every gradient equal the padded actor's within 1e-6 for Qwen3, Qwen3-MoE and tied-embedding
Llama, for the three loss aggregation modes (the normaliser counts the same tokens and sequences),
and the MoE router picks the same experts for every real token. Parallel layouts: test_packing_parallel.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_spo.megatron import packing
from megatron_spo.megatron.launch import run_distributed
from megatron_spo.megatron.parallel import ParallelSizes

TOL = 1e-6


def _batch(lengths, width=None, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    lengths = torch.tensor(lengths)
    ar = torch.arange(width).unsqueeze(0)
    return {"input_ids": torch.randint(1, vocab, (len(lengths), width), generator=g), "lengths": lengths,
            "loss_mask": ((ar >= 1) & (ar < lengths.unsqueeze(1))).float()}


# ------------------------------------------------------------------------------------------------
# planner and tensors (fast)
# ------------------------------------------------------------------------------------------------


def test_best_fit_decreasing_rows_fullest_first():
    lengths = [24, 11, 17, 8, 20, 13, 24, 9]
    assert packing.pack_rows(lengths, 24, range(8)) == [[0], [6], [5, 1], [4], [2], [7, 3]]
    assert packing.pack_rows([30, 5], 24, [0, 1]) == [[0], [1]]  # too long: a row of its own


def test_plan_respects_the_token_budget_and_covers_every_sequence():
    rng = random.Random(0)
    lengths = [rng.randint(64, 1024) for _ in range(200)]
    for budget in (1024, 4096, 16384):
        plan = packing.plan_packing(lengths, budget)
        assert sorted(s for mb in plan for row in mb for s in row) == list(range(200))
        width = max(lengths)
        assert all(len(mb) * width <= max(budget, width) for mb in plan)
        assert all(sum(lengths[s] for s in row) <= width for mb in plan for row in mb)
    thd = packing.plan_packing(lengths, 4096, thd=True)
    assert all(len(mb) == 1 and sum(lengths[s] for s in mb[0]) <= 4096 for mb in thd)


def test_packed_tokens_are_within_5_percent_of_the_real_ones():
    rng = random.Random(1)
    lengths = [rng.randint(64, 1024) for _ in range(256)]
    batch = _batch(lengths, vocab=7)
    mbs = packing.make_packed_micro_batches(batch, packing.plan_packing(lengths, 16384))
    assert sum(packing.computed_tokens(mb) for mb in mbs) / sum(lengths) <= 1.05


def test_rebalance_gives_exactly_the_count_and_never_more_rows_per_micro_batch():
    lengths = [24, 11, 17, 8, 20, 13, 24, 9]
    plan = packing.plan_packing(lengths, 48)
    for count in (4, 5, 8):
        out = packing.rebalance(plan, count)
        assert len(out) == count and all(mb and len(mb) <= 2 for mb in out)
        assert sorted(s for mb in out for row in mb for s in row) == list(range(8))
    thd = packing.rebalance(packing.plan_packing(lengths, 48, thd=True), 7)
    assert len(thd) == 7 and all(len(mb) == 1 for mb in thd)
    with pytest.raises(ValueError, match="cannot make 9 non-empty micro-batches from 8 sequences"):
        packing.rebalance(plan, 9)


def test_packed_tensors_map_every_token_back_to_its_sequence():
    lengths = [5, 3, 2, 6, 1]
    batch = _batch(lengths, width=7)
    (mb,) = packing.make_packed_micro_batches(batch, [[[3], [0, 2], [1, 4]]], width_multiple=4)
    assert mb["packed_ids"].shape == (3, 8)  # widest row 7, rounded up to 8
    assert mb["rows"].tolist() == [3, 0, 2, 1, 4] and mb["input_ids"].shape == (5, 6)
    flat = mb["packed_ids"].flatten()
    for j, row in enumerate(mb["rows"].tolist()):
        n = lengths[row]
        src = mb["packed_src"][j, :n]
        assert torch.equal(flat[src], batch["input_ids"][row, :n])
        assert mb["packed_pos"].flatten()[src].tolist() == list(range(n))
        assert (mb["packed_seg"].flatten()[src] == j).all()
    assert mb["packed_pos"][1].tolist() == [0, 1, 2, 3, 4, 0, 1, 0]  # tail restarts at 0
    mask = packing.block_causal_mask(mb["packed_seg"])[:, 0]
    allowed = ~mask[1]
    assert allowed[6, 5] and allowed[6, 6] and not allowed[6, 4] and not allowed[4, 5]  # sequences stay apart
    assert not allowed[7, 6] and allowed[7, 7]  # the tail sees only itself
    one = packing.block_causal_mask(torch.zeros(1, 4, dtype=torch.long))[0, 0]
    assert torch.equal(one, torch.ones(4, 4, dtype=torch.bool).triu(1))  # one segment = plain causal


def test_thd_bounds_and_fixed_shapes():
    lengths = [5, 3, 2, 6]
    batch = _batch(lengths)
    mbs = packing.make_packed_micro_batches(batch, [[[0, 2]], [[3, 1]]], thd=True, fixed_shape=True)
    assert [mb["packed_ids"].shape for mb in mbs] == [(1, 9), (1, 9)]
    assert mbs[0]["cu_seqlens"].tolist() == [0, 5, 7, 9] and mbs[1]["cu_seqlens"].tolist() == [0, 6, 9]
    assert mbs[0]["cu_seqlens"].dtype == torch.int32
    local = packing.make_packed_micro_batches(batch, [[[3]], [[0], [1, 2]]], fixed_shape=True)
    assert [mb["packed_ids"].shape for mb in local] == [(2, 6), (2, 6)]
    assert "cu_seqlens" not in local[0]
    with pytest.raises(ValueError, match="micro-batch 1 is empty"):
        packing.make_packed_micro_batches(batch, [[[0]], []])


def test_thd_packed_seq_params():
    from megatron_spo.megatron.packed_forward import thd_params

    p = thd_params(torch.tensor([0, 5, 7, 9], dtype=torch.int32))
    assert p.qkv_format == "thd" and p.cu_seqlens_q.tolist() == [0, 5, 7, 9] and p.cu_seqlens_kv is p.cu_seqlens_q
    assert (p.max_seqlen_q, p.max_seqlen_kv) == (5, 5)


# ------------------------------------------------------------------------------------------------
# the actor, packed vs padded (one spawned process)
# ------------------------------------------------------------------------------------------------


def run_actor(family, sizes, hf_dir, batch, *, packing_on, agg="token-mean", groups=None, micro_batch_tokens=48,
              use_te=None):
    """Score, forward-backward, gathered grads, one clipped SGD step, gathered params; logp over DP ranks."""
    from megatron.core import parallel_state as ps
    from test_actor_parallel import CLIP, LR, _full, _grads_as_params

    from megatron_spo.megatron.actor import LossSettings, MegatronActor
    from megatron_spo.megatron.batching import shard_for_data_parallel
    from megatron_spo.megatron.export import load_hf_weights
    from megatron_spo.megatron.model import load_hf_config
    from megatron_spo.megatron.optimizer import OptimSettings
    from megatron_spo.megatron.parallel import initialize_parallel

    cfg = load_hf_config(hf_dir)
    dp = initialize_parallel(sizes, hf_config=cfg, seed=7)
    loss = LossSettings(name="ppo", agg=agg, max_len=32 if agg == "seq-mean-token-sum-norm" else None)
    actor = MegatronActor(cfg, optim=OptimSettings(lr=LR, clip_grad=CLIP, optimizer="sgd"), loss=loss,
                          micro_batch_tokens=micro_batch_tokens, packing=packing_on, use_te=use_te)
    load_hf_weights(actor.model, hf_dir)
    local = shard_for_data_parallel(batch, ps.get_data_parallel_rank(), dp)
    computed = sum(packing.computed_tokens(mb) for mb in actor.micro_batches(local, groups))
    out = {"computed": computed, "logp": [None] * dp}
    torch.distributed.all_gather_object(out["logp"], actor.score(local, groups)["logp"],
                                        group=ps.get_data_parallel_group())
    metrics = actor.forward_backward(local, groups)
    with _grads_as_params(actor):
        out["grads"] = {k: v.float().cpu() for k, v in _full(actor, hf_dir).items()}
    out.update(grad_norm=actor.optimizer_step()["grad_norm"], loss=float(metrics["loss"]),
               ratio_max=float(metrics["actor/ratio_max"]), logp=torch.cat(out["logp"]).cpu(),
               params={k: v.float().cpu() for k, v in _full(actor, hf_dir).items()})
    return out


def diffs(a, b):
    """Max abs differences of two ``run_actor`` results (log-probs: relative, see below)."""
    def tree(x, y):
        return max((x[k] - y[k]).abs().max().item() for k in x)

    # log-probs relative to max(1, |logp|): values near -6 differ in fp32 by a couple of ulps (~2**-20 each)
    logp = ((a["logp"] - b["logp"]).abs() / a["logp"].abs().clamp_min(1.0)).max().item()
    # the max ratio likewise relative to max(1, ratio): at ratio ~20 one fp32 ulp is already 1.9e-6
    ratio_max = abs(a["ratio_max"] - b["ratio_max"]) / max(1.0, abs(a["ratio_max"]))
    return {"logp": logp, "loss": abs(a["loss"] - b["loss"]),
            "grad_norm": abs(a["grad_norm"] - b["grad_norm"]), "ratio_max": ratio_max,
            "grads": tree(a["grads"], b["grads"]), "params": tree(a["params"], b["params"])}


def _routing(actor, batch, groups):
    """Per MoE layer, the [rows of batch, T, E] expert choice of every token (one micro-batch)."""
    from megatron.core.transformer.moe.router import TopKRouter

    maps = []
    routers = [m for chunk in actor.model for m in chunk.modules() if isinstance(m, TopKRouter)]
    hooks = [r.register_forward_hook(lambda mod, inp, out: maps.append(out[1].detach().clone())) for r in routers]
    (mb,) = actor.micro_batches(batch, groups)
    actor.score(batch, groups)
    for h in hooks:
        h.remove()
    shape = mb.get("packed_ids", mb["input_ids"]).shape  # [rows, width]; tokens are ordered [width, rows]
    out = []
    for m in maps:
        per_token = m.view(shape[1], shape[0], -1).transpose(0, 1).reshape(shape[0] * shape[1], -1)
        full = torch.zeros(*batch["input_ids"].shape, m.shape[-1], dtype=torch.bool)
        for j, row in enumerate(mb["rows"].tolist()):
            n = int(batch["lengths"][row])
            src = mb["packed_src"][j, :n] if "packed_src" in mb else j * shape[1] + torch.arange(n)
            full[row, :n] = per_token[src]
        out.append(full)
    return out


def _single_worker(dirs, batch):
    from megatron_spo.megatron.actor import MegatronActor
    from megatron_spo.megatron.model import load_hf_config
    from megatron_spo.megatron.parallel import initialize_parallel, teardown_parallel

    out = {}
    for family, hf_dir in dirs.items():
        aggs = ("token-mean",) if family != "qwen3" else (
            "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
        for agg in aggs:
            ref = run_actor(family, ParallelSizes(), hf_dir, batch, packing_on=False, agg=agg)
            packed = run_actor(family, ParallelSizes(), hf_dir, batch, packing_on=True, agg=agg)
            out[(family, agg)] = {"diffs": diffs(ref, packed), "computed": (ref["computed"], packed["computed"])}
    # one packed micro-batch for all rows vs the padded one, explicit groups
    groups = [list(range(len(batch["lengths"])))]
    ref = run_actor("qwen3", ParallelSizes(), dirs["qwen3"], batch, packing_on=False, groups=groups)
    packed = run_actor("qwen3", ParallelSizes(), dirs["qwen3"], batch, packing_on=True, groups=groups)
    out["groups"] = diffs(ref, packed)
    cfg = load_hf_config(dirs["qwen3_moe"])
    routes = []
    for packing_on in (False, True):
        initialize_parallel(ParallelSizes(), hf_config=cfg, seed=7)
        from megatron_spo.megatron.export import load_hf_weights

        actor = MegatronActor(cfg, packing=packing_on)
        load_hf_weights(actor.model, dirs["qwen3_moe"])
        routes.append(_routing(actor, batch, groups))
    out["routing"] = {"layers": len(routes[0]), "equal": all(torch.equal(a, b) for a, b in zip(*routes)),
                      "chosen": int(sum(r.sum() for r in routes[0]))}
    teardown_parallel(destroy_process_group=False)
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from megatron_spo.models.tiny import make_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny_packing")
    return {family: str(make_tiny_model_dir(root / family, family, seed=3, tokenizer=False))
            for family in ("qwen3", "qwen3_moe", "llama")}


@pytest.fixture(scope="module")
def single(model_dirs):
    from test_actor_parallel import make_batch

    return run_distributed(_single_worker, 1, args=(model_dirs, make_batch(n_rows=8)), timeout=900)[0]


def test_packed_equals_padded_for_every_family_and_aggregation(single):
    for key, res in single.items():
        if key in ("groups", "routing"):
            continue
        print(key, res)
        padded, packed = res["computed"]
        assert packed < padded, key  # the batch has rows that share a packed row
        for name, value in res["diffs"].items():
            assert value <= TOL, (key, name, value)
    assert max(single["groups"].values()) <= TOL, single["groups"]


def test_moe_routing_is_unchanged_token_for_token(single):
    r = single["routing"]
    assert r["layers"] == 2 and r["chosen"] > 0
    assert r["equal"]
