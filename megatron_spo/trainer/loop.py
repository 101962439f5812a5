"""The training loop. Launch: ``torchrun --nproc-per-node G -m megatron_spo.train --config FILE``.

One step, in the order of spec §1.9 (DESIGN.md "The loop"); each line is one call below:

 1. sample prompts: a candidate pool from the shuffled dataset, then SPO's prioritized draw (or uniform)
 2. rollout on the engine fleet through the agent loop (rank 0), broadcast to every rank
 3. rewards (set by the rollout phase as samples finish)
 4. advantages from the tracker read BEFORE this step's update (SPO) or from the groups (GRPO)
 5. old log-probs recomputed by the actor
 6. policy update over ``train.updates_per_step`` mini-batches
 7. ρ with the updated policy (exact: re-score the stored rows; accumulated: the drift ledger)
 8. tracker update α ← ρα + r, β ← ρβ + (1 − r)
 9. weight sync to the engines (streaming export), log, eval, checkpoint; stop cleanly on preemption
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_spo.config import Config
from megatron_spo.run import collectives, spo_state, train_batch
from megatron_spo.run.metrics_log import MetricsLogger, PhaseClock, plot_metrics
from megatron_spo.run.preemption import PreemptionFlag
from megatron_spo.run.prompt_stream import PromptStream

log = logging.getLogger("megatron_spo.train")


@dataclass
class Run:
    """Everything the loop touches. ``engine``/``phase``/``logger`` live on rank 0 only."""

    cfg: Config
    actor: Any
    dataset: Any
    tokenizer: Any
    stream: PromptStream
    tracker: Any
    sampler: Any
    logger: Optional[MetricsLogger] = None
    engine: Any = None
    phase: Any = None
    validator: Any = None
    step: int = 0
    weight_version: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0


def setup(cfg: Config) -> Run:
    from transformers import AutoTokenizer

    from megatron_spo.data import load_prompts
    from megatron_spo.run.setup import build_actor

    actor = build_actor(cfg)
    rank = dist.get_rank()
    if rank == 0:
        cfg.save(cfg.io.run_dir)
        print(cfg.to_yaml(), flush=True)
    dataset = load_prompts(cfg.data.train_path, cfg.data.prompt_key, cfg.data.answer_key,
                           skip_bad_rows=cfg.data.skip_bad_rows)
    tracker = spo_state.build_tracker(cfg, dataset.keys()) if cfg.algo.advantage == "spo" else None
    run = Run(cfg=cfg, actor=actor, dataset=dataset, tokenizer=AutoTokenizer.from_pretrained(cfg.model.path),
              stream=PromptStream(len(dataset), seed=cfg.train.seed), tracker=tracker,
              sampler=spo_state.build_sampler(cfg, tracker))
    if rank == 0:
        from megatron_spo.run.engines import build_engine, context_len
        from megatron_spo.run.rollout_phase import RolloutPhase

        run.engine = build_engine(cfg)
        run.phase = RolloutPhase(run.engine, run.tokenizer, cfg.rollout, reward=cfg.data.reward,
                                 max_prompt_len=cfg.data.max_prompt_len, skip_bad_rows=cfg.data.skip_bad_rows,
                                 context_len=context_len(run.engine), seed=cfg.train.seed)
        if cfg.data.eval_paths and cfg.train.eval_every:
            from megatron_spo.run.validation import Validator

            run.validator = Validator(cfg, run.engine, run.tokenizer, context_len(run.engine))
    return run


# -------------------------------------------------------------------------------------------------
# The step
# -------------------------------------------------------------------------------------------------


def sample_prompts(run: Run) -> List[Any]:
    """Step 1: this step's prompt records (identical on every rank: same stream and sampler state)."""
    cfg = run.cfg
    if cfg.algo.advantage == "spo":
        pool = run.stream.take(min(cfg.algo.spo.pool_size, len(run.dataset)))
        keys = [run.dataset[i].key for i in pool]
        picked = run.sampler.sample(keys, cfg.train.prompts_per_step).tolist()
        probs = run.sampler.probabilities(keys)
        run.metrics.update({"sampler/pool_size": float(len(pool)),
                            "sampler/pool_sampleable": float((probs > 0).sum()),
                            "sampler/picked_prob_mass": float(probs[picked].sum()),
                            "sampler/picked_value_mean": float(run.tracker.values([keys[i] for i in picked]).mean())})
        return [run.dataset[pool[i]] for i in picked]
    return [run.dataset[i] for i in run.stream.take(cfg.train.prompts_per_step)]


def rollout(run: Run, records: List[Any]) -> List[Any]:
    """Steps 2-3: rank 0 rolls out (rewards set as samples finish); every rank receives the samples."""
    payload = [None]
    if run.rank == 0:
        n = 1 if run.cfg.algo.advantage == "spo" else run.cfg.algo.grpo.n
        mode = "single_stream" if n == 1 else "group"
        batch = run.phase.run(records, n, mode=mode, uid_prefix=f"s{run.step}-")
        run.metrics.update(batch.metrics)
        payload = [batch.samples]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    return payload[0]


def advantages(run: Run, samples: List[Any]) -> torch.Tensor:
    """Step 4: ``[B]`` sequence advantages (SPO: baseline read before this step's tracker update)."""
    rewards, ok = train_batch.rewards_of(samples), train_batch.ok_mask(samples)
    cfg = run.cfg
    if cfg.algo.advantage == "spo":
        baseline = run.tracker.values([s.key for s in samples])
        run.metrics["spo/baseline_mean"] = float(baseline.mean())
        return train_batch.sequence_advantages("spo", rewards, ok, baseline=baseline)
    group_ids = torch.tensor([s.meta["record"] for s in samples])
    return train_batch.sequence_advantages(cfg.algo.advantage, rewards, ok, group_ids=group_ids,
                                           norm_by_std=cfg.algo.grpo.norm_by_std)


def update_policy(run: Run, local: Dict[str, torch.Tensor]) -> List[float]:
    """Steps 5-6: old log-probs, then one optimizer step per mini-batch. Returns |Δlogp| per update."""
    local["old_logp"] = run.actor.score(local)["logp"]
    per_update = [run.actor.train_step(mb) for mb in train_batch.mini_batches(local, run.cfg.train.updates_per_step)]
    for key in per_update[0]:  # metrics are already global per update; report their mean over the step
        run.metrics[key] = sum(float(m[key]) for m in per_update) / len(per_update)
    ps = run.actor.ps  # count each DP shard once: its TP/PP/CP peers hold the same rows
    first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
    mis = train_batch.mismatch_sums(local["old_logp"], local["rollout_logp"], local["loss_mask"] * first)
    run.metrics.update(train_batch.finish_mismatch(collectives.reduce_sum_max(mis)))
    return [float(m["actor/abs_logratio"]) for m in per_update]


def update_tracker(run: Run, samples: List[Any], local: Dict[str, torch.Tensor], rows: List[int], drift: List[float]):
    """Steps 7-8: ρ with the updated policy, then α ← ρα + r, β ← ρβ + (1 − r) for the OK samples."""
    t, ok = run.tracker, train_batch.ok_mask(samples)
    keys = [s.key for s in samples]
    exact = t.rho_type == "kl" and t.rho_mode == "exact"
    if exact:
        now, remember = spo_state.exact_rho_inputs(run.actor, t, [keys[r] for r in rows], rows, local,
                                                   run.tokenizer.pad_token_id)
        now, remember = collectives.gather_rows(now), collectives.gather_rows(remember)
    elif t.rho_mode == "accumulated":
        t.record_step_drift(spo_state.step_drift(drift))
    good = [i for i in range(len(samples)) if bool(ok[i])]
    if not good:
        return
    gkeys = [keys[i] for i in good]
    rho = spo_state.exact_rho(t, gkeys, now, good) if exact else t.rho(gkeys)
    t.update(gkeys, train_batch.rewards_of(samples)[good], rho)
    if exact:
        spo_state.remember_rows(t, gkeys, remember, good)
    run.metrics.update({k: float(v) for k, v in t.metrics().items()})


def sync_weights(run: Run) -> None:
    """Step 9a: stream the updated weights to the engine (collective; rank 0 feeds the engine)."""
    from megatron_spo.megatron.export import export_hf_weights

    buckets = export_hf_weights(run.actor.model, run.actor.hf_config)
    if run.rank == 0:
        run.engine.update_weights(buckets, run.weight_version)
    else:
        for _ in buckets:
            pass


def train_step(run: Run) -> None:
    clock = PhaseClock(run.metrics)
    records = sample_prompts(run)
    with clock("rollout"):
        samples = rollout(run, records)
    seq_adv = advantages(run, samples)
    full = train_batch.with_advantages(train_batch.collate(samples, run.tokenizer.pad_token_id), seq_adv)
    ps = run.actor.ps
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    per = len(samples) // dp
    rows = list(range(dp_rank * per, (dp_rank + 1) * per))
    local = {k: v[rows[0]:rows[-1] + 1] for k, v in full.items()}
    with clock("update", tokens=float(full["loss_mask"].sum())):
        drift = update_policy(run, local)
    if run.tracker is not None:
        with clock("tracker"):
            update_tracker(run, samples, local, rows, drift)
    run.weight_version += 1
    with clock("weight_sync"):
        sync_weights(run)
    rewards = train_batch.rewards_of(samples)
    run.metrics.update({"reward/mean": float(rewards.mean()), "weight_version": float(run.weight_version)})


# -------------------------------------------------------------------------------------------------
# Checkpoints and the main loop
# -------------------------------------------------------------------------------------------------


def caller_state(run: Run) -> Dict[str, Any]:
    return {"step": run.step, "weight_version": run.weight_version, "stream": run.stream.state_dict(),
            "sampler": run.sampler.state_dict(), "tracker": run.tracker.state_dict() if run.tracker else None}


def save(run: Run) -> Path:
    from megatron_spo.megatron.checkpoint import save_checkpoint

    a = run.actor
    return save_checkpoint(Path(run.cfg.io.run_dir) / "checkpoints", run.step, a.model, a.optimizer, a.scheduler,
                           caller_state=caller_state(run), keep_last=run.cfg.io.keep_last, hf_dir=run.cfg.model.path)


def resume(run: Run) -> None:
    """``io.resume``: 'auto' continues from the newest complete checkpoint in the run dir, if any."""
    from megatron_spo.megatron.checkpoint import load_checkpoint

    where = run.cfg.io.resume
    if where == "none":
        return
    path = Path(run.cfg.io.run_dir) / "checkpoints" if where == "auto" else Path(where)
    a = run.actor
    loaded = load_checkpoint(path, a.model, a.optimizer, a.scheduler)
    if loaded is None:
        return
    state = loaded.caller_state
    run.step, run.weight_version = int(state["step"]), int(state["weight_version"])
    run.stream.load_state_dict(state["stream"])
    run.sampler.load_state_dict(state["sampler"])
    if run.tracker is not None:
        run.tracker.load_state_dict(state["tracker"])
    sync_weights(run)  # the engines start from the base weights: give them the resumed policy
    if run.rank == 0:
        print(f"resumed from {loaded.path} at step {run.step}", flush=True)


def train(cfg: Config) -> int:
    """Run (or resume) the whole training. Call it under ``if __name__ == "__main__":`` in a script:
    checkpoint saving starts helper processes that re-import the main module."""
    run = setup(cfg)
    resume(run)
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
            from megatron_spo.run.engines import close_rollout

            close_rollout(run.engine, run.validator, run.phase)
    if run.rank == 0:
        png = plot_metrics(Path(cfg.io.run_dir) / "metrics.jsonl", Path(cfg.io.run_dir) / "metrics.png")
        print(f"done: {run.step} steps; metrics in {cfg.io.run_dir}/metrics.jsonl, plot {png}", flush=True)
    return 0


if __name__ == "__main__":
    from megatron_spo.train_cli import main

    sys.exit(main())
