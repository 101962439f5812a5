"""Worker for tests/megatron/test_checkpoint.py, run under torchrun (dist_checkpointing's writer starts
a multiprocessing manager, which daemonic launcher children may not do; and torchrun is how trainers run).

The training step is a plain next-token cross-entropy on a tiny Qwen3 through Megatron DDP and
``get_megatron_optimizer`` (Adam) with an ``OptimizerParamScheduler``; the actor's RL step is not
needed to test that a checkpoint restores everything a step depends on. Randomness is deliberately
everywhere: dropout (torch RNG), token corruption (torch RNG), batch flips (python ``random``), so a
resume that forgot any RNG or the data position would diverge.

Usage: torchrun --nproc_per_node=N _ckpt_worker.py MODE OUT_JSON HF_DIR ROOT [TP2_ROOT]
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

STEPS, SAVE_AT, B = 6, 3, 2


def setup(hf_dir: str, tp: int, dropout: float, seed: int = 1234):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_spo.megatron.export import load_hf_weights
    from megatron_spo.megatron.model import build_model
    from megatron_spo.megatron.parallel import ParallelSizes, initialize_parallel

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    initialize_parallel(ParallelSizes(tp=tp), hf_config=cfg, seed=seed)
    random.seed(seed)
    np.random.seed(seed)
    (chunk,) = build_model(cfg, hidden_dropout=dropout, attention_dropout=dropout)
    load_hf_weights(chunk, hf_dir)
    model = DistributedDataParallel(
        chunk.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                    use_distributed_optimizer=False), chunk)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-5, weight_decay=0.01, params_dtype=torch.float32,
                                                 bf16=False, clip_grad=0.0), [model])
    sched = OptimizerParamScheduler(opt, init_lr=1e-4, max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=2, lr_decay_steps=20,
                                    lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=20,
                                    wd_incr_style="constant")
    corpus = torch.randint(0, cfg["vocab_size"], (64, 17), generator=torch.Generator().manual_seed(7))
    return model, opt, sched, corpus, cfg["vocab_size"]


def batch(corpus: torch.Tensor, cursor: int, vocab: int) -> torch.Tensor:
    rows = corpus[cursor % len(corpus): cursor % len(corpus) + B].clone()
    noise = torch.rand(rows.shape) < 0.1
    rows[noise] = torch.randint(0, vocab, (int(noise.sum()),))
    return rows.flip(0) if random.random() < 0.5 else rows


def train_step(model, opt, sched, rows: torch.Tensor) -> float:
    model.train()
    ids, labels = rows[:, :-1], rows[:, 1:]
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    model.zero_grad_buffer()
    opt.zero_grad()
    loss = model(ids, pos, None, labels=labels).float().mean()  # mean over B*T tokens
    loss.backward()
    # DP grad all-reduce, plus the TP all-reduce of q/k-layernorm grads (each TP rank sees other heads)
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads([model])
    ok, _, _ = opt.step()
    assert ok
    sched.step(increment=1)
    return loss.item()


def run(model, opt, sched, corpus, vocab, state: dict, until: int, losses: list, on_step=None) -> None:
    while state["step"] < until:
        rows = batch(corpus, state["data_pos"], vocab)
        state["data_pos"] += B
        losses.append(train_step(model, opt, sched, rows))
        state["step"] += 1
        state["weight_version"] += 1
        state["tracker"][f"prompt-{state['step']}"] = [1.0 + state["step"], 2.0]  # stands in for SPO state
        if on_step:
            on_step(state["step"])


def fresh_state() -> dict:
    return {"step": 0, "data_pos": 0, "weight_version": 0, "tracker": {}}


def full_logits(model, vocab: int) -> torch.Tensor:
    from megatron_spo.megatron.logprobs import full_vocab_logits

    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    return full_vocab_logits(model, ids, vocab)


def mode_reference_then_interrupted(out: dict, hf_dir: str, root: str) -> None:
    from megatron_spo import checkpoint_dir as cdir
    from megatron_spo.megatron.checkpoint import save_checkpoint

    model, opt, sched, corpus, vocab = setup(hf_dir, 1, 0.1)
    out["reference"] = []
    run(model, opt, sched, corpus, vocab, fresh_state(), STEPS, out["reference"])

    model, opt, sched, corpus, vocab = setup(hf_dir, 1, 0.1)
    out["interrupted"] = []
    state = fresh_state()

    def on_step(step):
        if step == SAVE_AT:
            save_checkpoint(root, step, model, opt, sched, caller_state=state, rank_state={"rank": 0},
                            keep_last=2, hf_dir=hf_dir)
        if step == SAVE_AT + 1:
            Path(sys.argv[2]).write_text(json.dumps(out))

            def die(*a, **k):  # killed after the dist files were written, before the manifest
                import multiprocessing

                # dist_checkpointing's writer-queue manager outlives us; the test kills it by pid.
                Path(sys.argv[2] + ".orphans").write_text(json.dumps([c.pid for c in multiprocessing.active_children()]))
                os._exit(9)

            cdir.write_manifest = die
            save_checkpoint(root, step, model, opt, sched, caller_state=state)

    run(model, opt, sched, corpus, vocab, state, STEPS, out["interrupted"], on_step)
    raise AssertionError("the interrupted run should have died while saving")


def mode_tp2_save(out: dict, hf_dir: str, root: str) -> None:
    from megatron_spo.megatron.checkpoint import save_checkpoint

    model, opt, sched, corpus, vocab = setup(hf_dir, 2, 0.0)
    state, losses = fresh_state(), []
    run(model, opt, sched, corpus, vocab, state, 2, losses)
    save_checkpoint(root, 2, model, opt, sched, caller_state=state, hf_dir=hf_dir)
    out["logits"] = full_logits(model, vocab).tolist()
    pos = state["data_pos"]
    out["next_loss"] = train_step(model, opt, sched, corpus[pos: pos + B])  # no noise: TP=1 replays it


def mode_resume_and_reshard(out: dict, hf_dir: str, root: str, tp2_root: str) -> None:
    from megatron_spo.megatron.checkpoint import load_checkpoint, save_checkpoint

    model, opt, sched, corpus, vocab = setup(hf_dir, 1, 0.1, seed=999)  # a different seed: all must come from the ckpt
    loaded = load_checkpoint(root, model, opt, sched)
    out["loaded_step"], out["loaded_caller"] = loaded.step, loaded.caller_state
    out["rank_state"], out["rng_restored"] = loaded.rank_state, loaded.rng_restored
    out["lr_after_load"] = opt.param_groups[0]["lr"]
    state, out["resumed"] = copy.deepcopy(loaded.caller_state), []
    run(model, opt, sched, corpus, vocab, state, STEPS, out["resumed"])
    final = save_checkpoint(root, STEPS, model, opt, sched, caller_state=state, keep_last=2)
    out["published"] = sorted(p.name for p in Path(root).iterdir())
    victim = max((p for p in (final / "dist").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as fh:  # a truncated checkpoint, as a full disk or a partial copy leaves it
        fh.truncate(victim.stat().st_size // 2)
    fallback = load_checkpoint(root, model, opt, sched)
    out["fallback_step"] = fallback.step
    state, out["after_fallback"] = copy.deepcopy(fallback.caller_state), []
    run(model, opt, sched, corpus, vocab, state, SAVE_AT + 1, out["after_fallback"])
    try:
        load_checkpoint(final, model, opt, sched)
        out["explicit_truncated"] = "loaded"
    except Exception as err:  # noqa: BLE001 - the test checks type and message
        out["explicit_truncated"] = f"{type(err).__name__}: {err}"
    # Negative control: the same checkpoint without restoring the RNG does not reproduce step 4.
    nothing = load_checkpoint(Path(root) / "step_00000003", model, opt, sched, restore_rng=False)
    torch.manual_seed(4242)
    random.seed(4242)
    state, out["no_rng"] = copy.deepcopy(nothing.caller_state), []
    run(model, opt, sched, corpus, vocab, state, SAVE_AT + 1, out["no_rng"])

    # A model-only checkpoint (what `convert hf-to-mcore` writes) asked for optimizer state: clear error.
    model_only = save_checkpoint(Path(root).parent / "model_only", 0, model)
    try:
        load_checkpoint(model_only, model, opt, sched)
        out["model_only_with_optimizer"] = "loaded"
    except ValueError as err:
        out["model_only_with_optimizer"] = str(err)
    out["model_only_step"] = load_checkpoint(model_only, model).step

    # Resharding: the TP=2 checkpoint into a TP=1 model (weights, Adam moments, scheduler).
    model, opt, sched, corpus, vocab = setup(hf_dir, 1, 0.0, seed=5)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # so nothing can come from the HF init
    loaded = load_checkpoint(tp2_root, model, opt, sched)
    out["reshard_step"], out["reshard_rank_state"] = loaded.step, loaded.rank_state
    out["reshard_rng_restored"] = loaded.rng_restored
    out["reshard_logits"] = full_logits(model, vocab).tolist()
    pos = loaded.caller_state["data_pos"]
    out["reshard_next_loss"] = train_step(model, opt, sched, corpus[pos: pos + B])


if __name__ == "__main__":
    mode, out_path, hf, ckpt_root = sys.argv[1:5]
    result: dict = {}
    {"interrupted": lambda: mode_reference_then_interrupted(result, hf, ckpt_root),
     "tp2": lambda: mode_tp2_save(result, hf, ckpt_root),
     "resume": lambda: mode_resume_and_reshard(result, hf, ckpt_root, sys.argv[5])}[mode]()
    import torch.distributed as dist

    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(result))
    dist.destroy_process_group()
