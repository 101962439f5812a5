"""The Megatron actor on 2 gloo processes equals the single-process run, and equals transformers.

Layout: one single-process spawn computes the references (and the micro-batch-split, clipping and
HF-parity checks); one 2-process spawn runs every parallel layout in turn (TP=2, PP=2, DP=2 for
Qwen3; PP=2 x VPP=2 for a 4-layer Qwen3; PP=2 for tied-embedding Llama; EP=2 (dense DP=2) and
PP=2 for Qwen3-MoE). Every layout loads the
same HF weights (``megatron_spo.megatron.export.load_hf_weights``, the conversion engineer's
mapping) and compares, after gathering full tensors by HF name:

* per-token log-probs (forward-only scoring path), the global loss, every gradient, and every
  parameter after one SGD step with gradient clipping active — max abs diff <= 1e-5;
* the loss for different micro-batch splits and DP layouts — <= 1e-6.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from megatron_spo.megatron.launch import run_distributed
from megatron_spo.megatron.parallel import ParallelSizes

LR = 0.5
CLIP = 0.05  # well below the tiny models' grad norm (~0.3-0.5), so clipping is active


def make_batch(n_rows=4, width=24, vocab=512, seed=0):
    """Random right-padded sequences; loss on positions >= 4; advantages per sequence."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([24, 11, 17, 8, 20, 13, 24, 9][:n_rows])
    ids = torch.randint(0, vocab, (n_rows, width), generator=g)
    ar = torch.arange(width).unsqueeze(0)
    mask = ((ar >= 4) & (ar < lengths.unsqueeze(1))).float()
    return {"input_ids": ids, "lengths": lengths, "loss_mask": mask,
            "old_logp": (-torch.rand(n_rows, width, generator=g) * 2 - 5.5) * mask,
            "advantages": torch.randn(n_rows, 1, generator=g).expand(n_rows, width).contiguous()}


@contextmanager
def _grads_as_params(actor):
    """Temporarily expose each parameter's DDP main_grad as its data (to gather grads like weights)."""
    saved = []
    for chunk in actor.model:
        for p in chunk.parameters():
            saved.append((p, p.data))
            p.data = p.main_grad.to(p.dtype)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


def _full(actor, hf_dir):
    from megatron_spo.megatron.export import iter_hf_tensors

    return {name: t.clone() for name, t in iter_hf_tensors(actor.model, hf_dir)}


def _run_layout(family, sizes, hf_dir, batch, groups=None, micro_batch_tokens=48, *, use_te=None,
                distributed_optimizer=False, gather_grads=True, agg="token-mean", optim_extra=None):
    """Score, forward-backward, gather grads, one clipped SGD step, gather params (one layout).

    ``gather_grads=False`` for the distributed optimizer, whose main_grad buffers hold only this
    rank's reduce-scattered shard after the backward. ``optim_extra``: other ``OptimSettings`` fields
    (e.g. Adam with CPU offload).
    """
    from megatron.core import parallel_state as ps

    from megatron_spo.megatron.actor import LossSettings, MegatronActor
    from megatron_spo.megatron.batching import shard_for_data_parallel
    from megatron_spo.megatron.export import load_hf_weights
    from megatron_spo.megatron.model import load_hf_config
    from megatron_spo.megatron.optimizer import OptimSettings
    from megatron_spo.megatron.parallel import initialize_parallel

    cfg = load_hf_config(hf_dir)
    dp = initialize_parallel(sizes, hf_config=cfg, seed=7)
    optim = {"lr": LR, "clip_grad": CLIP, "optimizer": "sgd", **(optim_extra or {})}
    actor = MegatronActor(cfg, optim=OptimSettings(distributed_optimizer=distributed_optimizer, **optim),
                          loss=LossSettings(name="ppo", agg=agg), micro_batch_tokens=micro_batch_tokens, use_te=use_te,
                          sequence_parallel=sizes.sequence_parallel)
    load_hf_weights(actor.model, hf_dir)
    local = shard_for_data_parallel(batch, ps.get_data_parallel_rank(), dp)
    scored = actor.score(local)
    metrics = actor.forward_backward(local, groups)
    grads = None
    if gather_grads:
        with _grads_as_params(actor):
            grads = _full(actor, hf_dir)
    step = actor.optimizer_step()
    params = _full(actor, hf_dir)
    # Reassemble per-row log-probs over DP ranks.
    logp = [None] * dp
    torch.distributed.all_gather_object(logp, scored["logp"], group=ps.get_data_parallel_group())
    return {"logp": torch.cat(logp).cpu(), "loss": float(metrics["loss"]),
            "grads": grads and {k: v.float().cpu() for k, v in grads.items()},
            "params": {k: v.float().cpu() for k, v in params.items()}, "grad_norm": step["grad_norm"]}


def _max_diff(a, b):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _reference_worker(dirs, batch):
    """Single process: references per family + micro-batch invariance + clipping + HF parity."""
    from transformers import AutoModelForCausalLM

    from megatron_spo.megatron.parallel import teardown_parallel

    out = {"qwen3_vpp": {"ref": _run_layout("qwen3_vpp", ParallelSizes(), dirs["qwen3_vpp"], batch)}}
    for family, hf_dir in dirs.items():
        if family == "qwen3_vpp":
            continue
        ref = _run_layout(family, ParallelSizes(), hf_dir, batch)
        # The same step with other micro-batch splits: one micro-batch, one row per micro-batch.
        one = _run_layout(family, ParallelSizes(), hf_dir, batch, groups=[list(range(len(batch["lengths"])))])
        rows = _run_layout(family, ParallelSizes(), hf_dir, batch, groups=[[i] for i in range(len(batch["lengths"]))])
        if family == "qwen3":  # per-sequence aggregation: the normaliser counts sequences
            seq = [_run_layout(family, ParallelSizes(), hf_dir, batch, groups=g, agg="seq-mean-token-mean")["loss"]
                   for g in ([[0, 1, 2, 3]], [[0], [1], [2], [3]], [[3, 1], [0, 2]])]
            out["seq_mean_loss_spread"] = max(seq) - min(seq)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = hf(batch["input_ids"]).logits
        hf_logp = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        valid = (torch.arange(batch["input_ids"].shape[1])[None, 1:] < batch["lengths"][:, None])
        out[family] = {
            "ref": ref,
            "split_loss_diff": max(abs(one["loss"] - ref["loss"]), abs(rows["loss"] - ref["loss"])),
            "split_grad_diff": max(_max_diff(one["grads"], ref["grads"]), _max_diff(rows["grads"], ref["grads"])),
            "hf_logp_diff": ((ref["logp"][:, 1:].double() - hf_logp) * valid).abs().max().item(),
        }
    out["checks"] = _config_and_input_checks(dirs, batch)
    teardown_parallel(destroy_process_group=False)
    return out


def _config_and_input_checks(dirs, batch):
    """MoE routing/aux-loss mapping and the actor's own bad-input errors (single process)."""
    from megatron_spo.megatron.actor import MegatronActor
    from megatron_spo.megatron.model import hf_to_transformer_config, load_hf_config
    from megatron_spo.megatron.parallel import initialize_parallel

    moe = load_hf_config(dirs["qwen3_moe"])
    initialize_parallel(ParallelSizes(), hf_config=moe)
    off = hf_to_transformer_config(moe)
    on = hf_to_transformer_config(moe, aux_loss_coef=0.01)
    no_norm = hf_to_transformer_config({**moe, "norm_topk_prob": False})
    actor = MegatronActor(moe)  # forward-only
    errors = {}
    for name, fn in {
        "too_long": lambda: actor.score({"input_ids": torch.zeros(1, 300, dtype=torch.long),
                                         "lengths": torch.tensor([300]), "loss_mask": torch.zeros(1, 300)}),
        "empty_group": lambda: actor.score(batch, groups=[[0, 1], [], [2, 3]]),
        "train_without_optim": lambda: actor.forward_backward(batch),
    }.items():
        try:
            fn()
            errors[name] = None
        except Exception as err:  # noqa: BLE001 - the message is what the test checks
            errors[name] = f"{type(err).__name__}: {err}"
    return {
        "aux_off": (off.moe_router_load_balancing_type, off.moe_aux_loss_coeff),
        "aux_on": (on.moe_router_load_balancing_type, on.moe_aux_loss_coeff),
        "pre_softmax": (off.moe_router_pre_softmax, no_norm.moe_router_pre_softmax),
        "moe_dims": (off.num_moe_experts, off.moe_router_topk, off.moe_ffn_hidden_size, off.moe_grouped_gemm),
        "errors": errors,
    }


def _parallel_worker(dirs, batch):
    """Two processes: every layout in turn; rank 0's gathered results are returned."""
    from megatron_spo.megatron.parallel import teardown_parallel

    layouts = [
        ("qwen3", ParallelSizes(tp=2)),
        ("qwen3", ParallelSizes(pp=2)),
        ("qwen3", ParallelSizes()),  # DP=2
        ("llama", ParallelSizes(pp=2)),  # tied embeddings across pipeline stages
        ("qwen3_moe", ParallelSizes(ep=2, etp=1)),  # EP=2 (expert-DP 1, dense DP 2)
        ("qwen3_moe", ParallelSizes(pp=2)),
    ]
    out = []
    for family, sizes in layouts:
        res = _run_layout(family, sizes, dirs[family], batch, micro_batch_tokens=40)
        out.append((family, sizes, res))
    # 4 layers = 2 pipeline stages x 2 virtual stages (interleaved 1F1B schedule).
    out.append(("qwen3_vpp", ParallelSizes(pp=2, vpp=2),
                _run_layout("qwen3_vpp", ParallelSizes(pp=2, vpp=2), dirs["qwen3_vpp"], batch, micro_batch_tokens=40)))
    teardown_parallel(destroy_process_group=False)
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from megatron_spo.models.tiny import make_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny")
    dirs = {family: str(make_tiny_model_dir(root / family, family, seed=3, tokenizer=False))
            for family in ("qwen3", "llama", "qwen3_moe")}
    # 4 layers: 2 pipeline stages x 2 virtual stages.
    dirs["qwen3_vpp"] = str(make_tiny_model_dir(root / "qwen3_vpp", "qwen3", seed=4, tokenizer=False,
                                                num_hidden_layers=4))
    return dirs


@pytest.fixture(scope="module")
def results(model_dirs):
    batch = make_batch()
    refs = run_distributed(_reference_worker, 1, args=(model_dirs, batch), timeout=600)[0]
    par = run_distributed(_parallel_worker, 2, args=(model_dirs, batch), timeout=900)
    return refs, par


def test_moe_router_mapping_and_actor_input_errors(results):
    checks = results[0]["checks"]
    assert checks["aux_off"] == ("none", 0.0)  # RL default: no load-balancing loss
    assert checks["aux_on"] == ("aux_loss", 0.01)
    # norm_topk_prob=True: top-k of logits then softmax over k (= renormalised); False: softmax first.
    assert checks["pre_softmax"] == (False, True)
    assert checks["moe_dims"] == (4, 2, 32, False)  # SequentialMLP on CPU
    errors = checks["errors"]
    assert errors["too_long"] == "ValueError: sequence 0 has length 300 > the model's max positions 256"
    assert errors["empty_group"] == "ValueError: micro-batch 1 is empty (no sequences)"
    assert errors["train_without_optim"].startswith("RuntimeError: forward-only actor")


def test_micro_batch_split_does_not_change_loss_or_grads(results):
    refs, _ = results
    assert refs["seq_mean_loss_spread"] <= 1e-6
    for family, r in refs.items():
        if family in ("checks", "qwen3_vpp", "seq_mean_loss_spread"):
            continue
        assert r["split_loss_diff"] <= 1e-6, (family, r["split_loss_diff"])
        assert r["split_grad_diff"] <= 1e-6, (family, r["split_grad_diff"])


def test_logprobs_equal_transformers_forward(results):
    refs, _ = results
    for family, r in refs.items():
        if family in ("checks", "qwen3_vpp", "seq_mean_loss_spread"):
            continue
        assert r["hf_logp_diff"] <= 1e-5, (family, r["hf_logp_diff"])


def test_clipping_is_active_and_sgd_step_is_clipped(results):
    refs, _ = results
    for family, r in refs.items():
        if family in ("checks", "qwen3_vpp", "seq_mean_loss_spread"):
            continue
        ref = r["ref"]
        assert ref["grad_norm"] > CLIP, (family, ref["grad_norm"])
        # The clipped SGD step, recomputed here from the gathered grads: p1 = p0 - lr * g * clip/|g|.
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref["grads"].values())).item()
        assert abs(norm - ref["grad_norm"]) <= 1e-5 * max(1.0, norm)


def test_parallel_layouts_equal_single_process(results, model_dirs):
    refs, par = results
    from safetensors.torch import load_file

    for rank_out in par:
        for family, sizes, res in rank_out:
            ref = refs[family]["ref"]
            where = f"{family} {sizes}"
            print(where, {"logp": (res["logp"] - ref["logp"]).abs().max().item(),
                          "loss": abs(res["loss"] - ref["loss"]), "grads": _max_diff(res["grads"], ref["grads"]),
                          "params": _max_diff(res["params"], ref["params"])})
            assert (res["logp"] - ref["logp"]).abs().max().item() <= 1e-5, where
            assert abs(res["loss"] - ref["loss"]) <= 1e-6, where
            assert _max_diff(res["grads"], ref["grads"]) <= 1e-5, where
            assert abs(res["grad_norm"] - ref["grad_norm"]) <= 1e-5, where
            assert _max_diff(res["params"], ref["params"]) <= 1e-5, where
    # And the step moved the weights by exactly -lr * clipped grad (checked against the HF file).
    for family, r in refs.items():
        if family in ("checks", "qwen3_vpp", "seq_mean_loss_spread"):
            continue
        init = load_file(f"{model_dirs[family]}/model.safetensors")
        ref = r["ref"]
        scale = min(1.0, CLIP / (ref["grad_norm"] + 1e-6))
        expected = {k: init[k] - LR * scale * ref["grads"][k] for k in ref["params"]}
        assert _max_diff(ref["params"], expected) <= 1e-6, family
