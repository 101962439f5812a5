"""The training loop (launch: ``torchrun --nproc-per-node G -m megatron_spo.train --config FILE``).

One step, in the order of docs/algorithms.md §1.9; the algorithm family (``run.algorithm``, see
``megatron_spo.trainer.algorithm``) decides every algorithm-specific part, so this loop has the same
shape for SPO, GRPO and any later family:

 1. draw the step's prompts (family: SPO's prioritized pick from a pool with v̂ read now; GRPO's next prompts)
 2. rollout on the engine fleet (rank 0; family: samples per prompt, delivery, extra generations),
    rewards set as samples finish, broadcast to every rank
 3. ``[B, T]`` advantages for the whole batch (family)
 4. old log-probs recomputed by the actor (and the reference policy's, for a KL penalty)
 5. policy update over ``train.updates_per_step`` mini-batches
 6. after the update (family: SPO's ρ with the updated policy and tracker update)
 7. weight sync to the engines (streaming export), log, eval, checkpoint; stop cleanly on preemption
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List

import torch

from megatron_spo.config import Config
from megatron_spo.megatron.group_device import broadcast_objects
from megatron_spo.rollout.sample import Sample
from megatron_spo.trainer import collectives, train_batch
from megatron_spo.trainer.algorithm import Draw, UpdateOutcome
from megatron_spo.trainer.checkpointing import check_resume_path, resume, save
from megatron_spo.trainer.metrics_log import MetricsLogger, PhaseClock, plot_metrics
from megatron_spo.trainer.preemption import PreemptionFlag
from megatron_spo.trainer.setup import Run, setup

log = logging.getLogger("megatron_spo.train")


def rollout(run: Run, draw: Draw) -> List[Sample]:
    """Step 2: rank 0 rolls out through the family (rewards set as samples finish); every rank receives the samples."""
    payload = [None]
    if run.rank == 0:
        batch = run.algorithm.rollout(run.phase, draw, uid_prefix=f"s{run.step}-")
        run.metrics.update(batch.metrics)
        payload = [batch.samples]
    return broadcast_objects(payload, src=0)[0]


def pad_for_data_parallel(samples: List[Sample], dp: int) -> List[Sample]:
    """``samples`` plus failed placeholders up to a multiple of ``dp``: every data-parallel rank gets an
    equal share and no sample falls off the end of the batch.

    The batch is short when prompts were skipped as bad input (``data.skip_bad_rows``). A placeholder
    is a failed sample, so it trains nothing (all-zero loss mask, advantage 0) and stays out of the
    advantage statistics and of the tracker update; it borrows the prompt key and draw record of the
    batch's last sample (families look those up for every sample) and its first two prompt tokens
    (a cheap row to score).
    """
    short = -len(samples) % dp
    if not samples or not short:
        return samples
    src = samples[-1]
    return samples + [Sample(uid=f"{src.uid}#pad{i}", request_uid=src.request_uid, key=src.key,
                             prompt_ids=list(src.prompt_ids[:2]), meta=dict(src.meta))
                      .fail(f"placeholder padding the batch to a multiple of the data-parallel size {dp}")
                      for i in range(short)]


def update_policy(run: Run, local: Dict[str, torch.Tensor]) -> List[float]:
    """Steps 4-5: old log-probs, then one optimizer step per mini-batch. Returns |Δlogp| per update."""
    local["old_logp"] = run.actor.score(local)["logp"]
    if run.reference is not None:  # the KL penalty's reference policy (algo.loss.kl_coef > 0)
        local["ref_logp"] = run.reference.score(local)
    per_update = [run.actor.train_step(mb) for mb in train_batch.mini_batches(local, run.cfg.train.updates_per_step)]
    for key in per_update[0]:  # metrics are already global per update; report their mean over the step
        run.metrics[key] = sum(float(m[key]) for m in per_update) / len(per_update)
    ps = run.actor.ps  # count each DP shard once: its TP/PP/CP peers hold the same rows
    first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
    mis = train_batch.mismatch_sums(local["old_logp"], local["rollout_logp"], local["loss_mask"] * first)
    run.metrics.update(train_batch.finish_mismatch(collectives.reduce_sum_max(mis)))
    return [float(m["actor/abs_logratio"]) for m in per_update]


def sync_weights(run: Run) -> None:
    """Step 7a: stream the updated weights to the engine (collective; rank 0 feeds the engine)."""
    from megatron_spo.megatron.export import export_hf_weights

    buckets = export_hf_weights(run.actor.model, run.actor.hf_config)
    if run.rank == 0:
        run.engine.update_weights(buckets, run.weight_version)
    else:
        for _ in buckets:
            pass


def train_step(run: Run) -> None:
    clock = PhaseClock(run.metrics)
    draw = run.algorithm.draw(run.metrics)
    with clock("rollout"):
        samples = rollout(run, draw)
    ps = run.actor.ps
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    rolled = len(samples)
    samples = pad_for_data_parallel(samples, dp)
    if len(samples) > rolled:
        run.metrics["train/padding_samples"] = float(len(samples) - rolled)
    batch = train_batch.collate(samples, run.tokenizer.pad_token_id)
    batch["advantages"] = run.algorithm.advantages(draw, samples, batch, run.metrics)
    per = len(samples) // dp
    rows = list(range(dp_rank * per, (dp_rank + 1) * per))
    local = {k: v[rows[0]:rows[-1] + 1] for k, v in batch.items()}
    with clock("update", tokens=float(batch["loss_mask"].sum())):
        drift = update_policy(run, local)
    with clock("after_update"):
        run.algorithm.after_update(run.actor, UpdateOutcome(samples, local, rows, drift, run.tokenizer.pad_token_id),
                                   run.metrics)
    run.weight_version += 1
    with clock("weight_sync"):
        sync_weights(run)
    rewards = train_batch.rewards_of(samples[:rolled])  # placeholders are no rollout
    run.metrics.update({"reward/mean": float(rewards.mean()), "weight_version": float(run.weight_version)})


def train(cfg: Config) -> int:
    """Run (or resume) the whole training. Call it under ``if __name__ == "__main__":`` in a script:
    checkpoint saving starts helper processes that re-import the main module."""
    check_resume_path(cfg)  # a named checkpoint that is not there fails before the model is built
    run = setup(cfg)
    if resume(run):
        sync_weights(run)  # the engines start from the base weights: give them the resumed policy
    stop = PreemptionFlag(stop_file=Path(cfg.io.run_dir) / "STOP")
    run.logger = MetricsLogger(cfg.io.run_dir, cfg.train.steps, enabled=run.rank == 0, tensorboard=cfg.io.tensorboard,
                               wandb_project="megatron_spo" if cfg.io.wandb else None, start_step=run.step)
    try:
        if run.validator is not None and run.step == 0:  # the starting point of the eval curves
            run.logger.log(0, run.validator.run())
        while run.step < cfg.train.steps:
            t0 = time.monotonic()
            run.metrics = {}
            train_step(run)
            if run.validator is not None and (run.step + 1) % cfg.train.eval_every == 0:
                run.metrics.update(run.validator.run())
            run.metrics["step_seconds"] = time.monotonic() - t0
            if run.step % cfg.io.log_every == 0:
                run.logger.log(run.step, run.metrics)
            run.step += 1
            preempted = stop.should_stop()
            if preempted or (cfg.train.save_every and run.step % cfg.train.save_every == 0):
                save(run)
            if preempted:
                if run.rank == 0:
                    (Path(cfg.io.run_dir) / "PREEMPTED").write_text(f"{stop.signal_name} at step {run.step}\n")
                    stop.clear_stop_file()
                return 0
        save(run)
    finally:
        run.logger.close()
        stop.restore()
        if run.rank == 0:
            from megatron_spo.rollout.build import close_rollout

            close_rollout(run.engine, run.validator, run.phase)
    if run.rank == 0:
        png = plot_metrics(Path(cfg.io.run_dir) / "metrics.jsonl", Path(cfg.io.run_dir) / "metrics.png")
        print(f"done: {run.step} steps; metrics in {cfg.io.run_dir}/metrics.jsonl, plot {png}", flush=True)
    return 0
