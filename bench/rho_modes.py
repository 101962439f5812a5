"""P2: the SPO tracker's ρ in ``exact`` vs ``accumulated`` mode: forward work, and agreement of the estimates.

Two trainer runs on the demo task (``megatron_spo.trainer.loop.setup`` + ``train_step``, the demo config:
32 prompts x 1 response per step, 2 PPO updates per step, same warm model and seed), one after the
other in fresh processes, single process world (DP = 1):

1. **exact** (``algo.spo.rho_mode=exact``, the reference): after the update the trainer re-scores each
   prompt's stored row and scores the current rows (``megatron_spo.trainer.spo.exact_rho_inputs``).
2. **accumulated** (``algo.spo.rho_mode=accumulated``): ρ from the drift ledger, fed once per step with
   ``megatron_spo.trainer.spo.step_drift`` of the per-update ``actor/abs_logratio``.

**Forward work.** ``actor.score`` and ``actor.train_step`` are wrapped (the package is unchanged) to
count the tokens each call pushes through the model: the real (unpadded) row lengths, prompt +
response. "Trained tokens" are the response tokens that carry loss (``loss_mask``) in the step's
training batch, counted once per step. The table gives, per trained token and per run:
old-log-prob scoring, training forwards, ρ scoring (calls made inside ``exact_rho_inputs``) and the
total; also sequences forwarded per trained sequence and the wall time per step (noisy on a shared
machine, for information only).

**Agreement.** During the exact run a shadow ``ValueTracker`` in accumulated mode (same ρ settings,
Beta(½, ½) prior) is fed exactly what the accumulated trainer would feed it: the same per-update
drift (``step_drift``), then ``accumulated_distance`` and ``update`` for the same prompts and rewards.
For every (step, prompt) with a non-first visit (the exact tracker has a stored row) we keep both
distances D (nats per response token) and both ρ, and report Pearson and Spearman (average ranks
for ties) correlations, the means, and how often each ρ sits on a clip bound (where ρ is constant
and carries no information, so ρ's correlation can be undefined although D's is not).

``actor/abs_logratio`` (mean |logπ_θ − logπ_old| over valid tokens of a mini-batch, a sum + count
metric) is what ``step_drift`` reads. If ``megatron_spo/megatron/actor.py`` does not emit it, this
script adds it inside the run by wrapping the actor's ``_loss_terms`` (training forwards only: same
logp, no extra forward) and says so in its output.

The last line is ``ratio: <tokens forwarded per trained token, exact / accumulated>``.

    OMP_NUM_THREADS=1 python bench/rho_modes.py [--steps 100 --run-dir runs/bench_p2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from megatron_spo.fresh_process import in_fresh_process


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan with fewer than 2 pairs or when either side is constant."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"pearson: {n} x values but {len(y)} y values")
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def ranks(x: Sequence[float]) -> List[float]:
    """1-based ranks, ties get the average of the ranks they span."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for t in range(i, j + 1):
            out[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman correlation: Pearson of the average ranks."""
    return pearson(ranks(x), ranks(y))


# ------------------------------------------------------------------------------------------------
# instrumentation (wrappers on one run's objects; nothing in the package changes)
# ------------------------------------------------------------------------------------------------


class ForwardCounter:
    """Tokens and rows pushed through the actor, by purpose."""

    def __init__(self) -> None:
        self.tokens = {"score_old": 0, "train": 0, "score_rho": 0}
        self.rows = {"score_old": 0, "train": 0, "score_rho": 0}
        self.trained_tokens = 0
        self.trained_rows = 0
        self.in_rho = False

    def wrap(self, actor: Any) -> None:
        score, train_step = actor.score, actor.train_step

        def counted_score(batch, groups=None):
            part = "score_rho" if self.in_rho else "score_old"
            self.tokens[part] += int(batch["lengths"].sum())
            self.rows[part] += int(batch["lengths"].numel())
            return score(batch, groups)

        def counted_train_step(batch, groups=None):
            self.tokens["train"] += int(batch["lengths"].sum())
            self.rows["train"] += int(batch["lengths"].numel())
            # mini-batches partition the step's rows: each trained token is counted once per step
            self.trained_tokens += int(batch["loss_mask"].sum())
            self.trained_rows += int((batch["loss_mask"].sum(1) > 0).sum())
            return train_step(batch, groups)

        actor.score, actor.train_step = counted_score, counted_train_step

    def wrap_rho_inputs(self, spo_step: Any) -> None:
        inner = spo_step.exact_rho_inputs

        def flagged(*args, **kwargs):
            self.in_rho = True
            try:
                return inner(*args, **kwargs)
            finally:
                self.in_rho = False

        spo_step.exact_rho_inputs = flagged

    def summary(self) -> Dict[str, float]:
        t = max(self.trained_tokens, 1)
        r = max(self.trained_rows, 1)
        out = {f"tokens_{k}_per_trained_token": v / t for k, v in self.tokens.items()}
        out["tokens_per_trained_token"] = sum(self.tokens.values()) / t
        out["rows_per_trained_row"] = sum(self.rows.values()) / r
        out["trained_tokens"] = float(self.trained_tokens)
        out["forward_tokens"] = float(sum(self.tokens.values()))
        return out


def ensure_abs_logratio(actor: Any) -> str:
    """Make the actor's training metrics carry ``actor/abs_logratio``; returns who provides it."""
    import inspect

    import torch

    from megatron_spo.megatron import actor as actor_module

    if "actor/abs_logratio" in inspect.getsource(actor_module):
        return "actor.py"
    inner = actor._loss_terms

    def terms(logp, entropy, mb):
        out = inner(logp, entropy, mb)
        if logp.requires_grad:  # a training forward; the normaliser pass feeds old_logp without grad
            mask = mb["loss_mask"].to(torch.float64)
            gap = (logp.detach().double() - mb["old_logp"].double()).abs()
            out[0].metrics["actor/abs_logratio"] = (gap * mask).sum()
            out[0].metrics["actor/abs_logratio/count"] = mask.sum()
        return out

    actor._loss_terms = terms
    return "bench wrapper of actor._loss_terms"


class ShadowAccumulated:
    """An accumulated-mode tracker fed like the accumulated trainer, next to an exact-mode run."""

    def __init__(self, run: Any) -> None:
        from megatron_spo.algos.spo_tracker import ValueTracker

        t = run.algorithm.tracker
        cfg = {**t.config(), "rho_mode": "accumulated"}
        self.shadow = ValueTracker(**cfg)
        self.shadow.add(list(dict.fromkeys(run.dataset.keys())), 0.5, 0.5)
        self.exact = t
        self.captured: List[Any] = []
        self.pairs: List[Dict[str, float]] = []
        self.drifts: List[float] = []
        inner = t.exact_distance

        def capture(keys, logp_now):
            d = inner(keys, logp_now)
            self.captured.append((list(keys), d.clone()))
            return d

        t.exact_distance = capture

    def wrap(self, run: Any) -> None:
        """Feed the shadow from the SPO family's after-update step (the package is unchanged)."""
        from megatron_spo.trainer import spo as spo_step
        from megatron_spo.trainer import train_batch

        family = run.algorithm
        inner = family.after_update

        def after_update(actor, outcome, metrics):
            samples, drift = outcome.samples, outcome.abs_logratio
            ok = train_batch.ok_mask(samples)
            good = [i for i in range(len(samples)) if bool(ok[i])]
            gkeys = [samples[i].key for i in good]
            step_drift = spo_step.step_drift(drift)
            self.drifts.append(step_drift)
            self.shadow.record_step_drift(step_drift)
            if gkeys:
                d_acc = self.shadow.accumulated_distance(gkeys)
                rho_acc = self.shadow.rho_from_distance(d_acc)
                revisit = self.exact.has_memory(gkeys)
            self.captured.clear()
            inner(actor, outcome, metrics)
            if not gkeys:
                return
            keys, d_ex = self.captured[-1]
            if keys != gkeys:
                raise RuntimeError("exact distance was computed for other keys than the step's OK samples")
            rho_ex = self.exact.rho_from_distance(d_ex)
            for i in range(len(gkeys)):
                if bool(revisit[i]):
                    self.pairs.append({"step": run.step, "d_exact": float(d_ex[i]), "d_acc": float(d_acc[i]),
                                       "rho_exact": float(rho_ex[i]), "rho_acc": float(rho_acc[i])})
            self.shadow.update(gkeys, train_batch.rewards_of(samples)[good], rho_acc)

        family.after_update = after_update

    def summary(self) -> Dict[str, Any]:
        p = self.pairs
        col = {k: [q[k] for q in p] for k in ("d_exact", "d_acc", "rho_exact", "rho_acc")}
        t = self.exact

        def clipped(v):
            return sum(1 for x in v if x <= t.rho_min + 1e-12 or x >= t.rho_max - 1e-12) / max(len(v), 1)

        return {
            "pairs": len(p),
            "pearson_d": pearson(col["d_exact"], col["d_acc"]),
            "spearman_d": spearman(col["d_exact"], col["d_acc"]),
            "pearson_rho": pearson(col["rho_exact"], col["rho_acc"]),
            "spearman_rho": spearman(col["rho_exact"], col["rho_acc"]),
            "mean_d_exact": sum(col["d_exact"]) / max(len(p), 1),
            "mean_d_acc": sum(col["d_acc"]) / max(len(p), 1),
            "mean_rho_exact": sum(col["rho_exact"]) / max(len(p), 1),
            "mean_rho_acc": sum(col["rho_acc"]) / max(len(p), 1),
            "frac_acc_ge_exact": sum(1 for a, b in zip(col["d_acc"], col["d_exact"]) if a >= b) / max(len(p), 1),
            "rho_exact_on_clip": clipped(col["rho_exact"]),
            "rho_acc_on_clip": clipped(col["rho_acc"]),
            "mean_step_drift": sum(self.drifts) / max(len(self.drifts), 1),
        }


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------


def run_mode(mode: str, warm: str, data: str, run_dir: str, *, steps: int, seed: int) -> Dict[str, Any]:
    """``steps`` trainer steps with ``algo.spo.rho_mode=mode``, instrumented (run in a fresh process)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from megatron_spo.trainer import loop as train_module
    from megatron_spo.config import load_config
    from megatron_spo.demo import demo_overrides
    from megatron_spo.megatron.parallel import teardown_parallel
    from megatron_spo.trainer import spo as spo_step
    from megatron_spo.rollout.build import close_engine

    overrides = demo_overrides(Path(run_dir), Path(warm), Path(data), "spo", steps) + [
        f"train.seed={seed}", f"algo.spo.rho_mode={mode}", "io.tensorboard=false", "train.eval_every=0"]
    run = train_module.setup(load_config(None, overrides))
    counter = ForwardCounter()
    counter.wrap(run.actor)
    counter.wrap_rho_inputs(spo_step)
    drift_source = ensure_abs_logratio(run.actor)
    shadow = None
    if mode == "exact":
        shadow = ShadowAccumulated(run)
        shadow.wrap(run)
    rewards, seconds = [], []
    while run.step < steps:
        run.metrics = {}
        t0 = time.monotonic()
        train_module.train_step(run)
        seconds.append(time.monotonic() - t0)
        rewards.append(run.metrics["reward/mean"])
        run.step += 1
    run.phase.close()
    close_engine(run.engine)
    teardown_parallel()
    out = {"mode": mode, "forward": counter.summary(), "drift_source": drift_source,
           "step_seconds": sorted(seconds)[len(seconds) // 2], "reward_first": rewards[0],
           "reward_last10": sum(rewards[-10:]) / len(rewards[-10:]), "ledger": float(run.algorithm.tracker.ledger)}
    if shadow is not None:
        out["agreement"] = shadow.summary()
        out["pairs"] = shadow.pairs
    return out




def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.3f}"


def main(argv: Optional[List[str]] = None) -> int:
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)  # smaller defaults; explicit flags still win
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a run of about 3 minutes: 8 trainer steps per mode")
    p.add_argument("--steps", type=int, default=8 if quick else 100, help="trainer steps per mode (default 100)")
    p.add_argument("--run-dir", default="runs/bench_p2")
    p.add_argument("--warm-steps", type=int, default=110)
    p.add_argument("--warm-lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_spo.demo import prepare

    run_dir = Path(a.run_dir)
    warm, data = prepare(run_dir, warm_steps=a.warm_steps, warm_lr=a.warm_lr, seed=a.seed)
    res = {mode: in_fresh_process(run_dir / f"{mode}.log", run_mode, mode, str(warm), str(data), str(run_dir / mode),
                             steps=a.steps, seed=a.seed)
           for mode in ("exact", "accumulated")}
    ex, acc = res["exact"]["forward"], res["accumulated"]["forward"]
    print(f"SPO tracker rho: exact vs accumulated, {a.steps} demo steps each (32 prompts x 1, 2 updates/step); "
          f"actor/abs_logratio from {res['exact']['drift_source']}")
    print(f"{'forward work per trained token':<36} {'exact':>9} {'accum.':>9}")
    rows = [("old log-probs (score)", "tokens_score_old_per_trained_token"),
            ("training forwards", "tokens_train_per_trained_token"),
            ("rho re-scoring (score)", "tokens_score_rho_per_trained_token"),
            ("total tokens / trained token", "tokens_per_trained_token"),
            ("total rows / trained row", "rows_per_trained_row")]
    for label, key in rows:
        print(f"{label:<36} {ex[key]:>9.3f} {acc[key]:>9.3f}")
    print(f"{'trained tokens (run total)':<36} {ex['trained_tokens']:>9.0f} {acc['trained_tokens']:>9.0f}")
    print(f"{'median step seconds (shared CPU)':<36} {res['exact']['step_seconds']:>9.3f} "
          f"{res['accumulated']['step_seconds']:>9.3f}")
    for label, key in (("train reward, step 1", "reward_first"), ("train reward, last 10 steps", "reward_last10")):
        print(f"{label:<36} {res['exact'][key]:>9.3f} {res['accumulated'][key]:>9.3f}")
    g = res["exact"]["agreement"]
    print(f"agreement over the exact run, {g['pairs']} (step, prompt) revisits "
          f"(shadow accumulated tracker fed the same drift; mean step drift {g['mean_step_drift']:.4f} nats):")
    print(f"{'':<22} {'pearson':>8} {'spearman':>9} {'mean exact':>11} {'mean accum.':>12} {'on clip (ex/acc)':>17}")
    print(f"{'D (nats/token)':<22} {_fmt(g['pearson_d']):>8} {_fmt(g['spearman_d']):>9} "
          f"{g['mean_d_exact']:>11.4f} {g['mean_d_acc']:>12.4f} {'':>17}")
    print(f"{'rho':<22} {_fmt(g['pearson_rho']):>8} {_fmt(g['spearman_rho']):>9} "
          f"{g['mean_rho_exact']:>11.4f} {g['mean_rho_acc']:>12.4f} "
          f"{g['rho_exact_on_clip']:>8.2f}/{g['rho_acc_on_clip']:.2f}")
    print(f"D_accumulated >= D_exact on {g['frac_acc_ge_exact']:.1%} of revisits")
    (run_dir / "rho_modes.json").write_text(json.dumps(res, indent=1))
    ratio = ex["tokens_per_trained_token"] / acc["tokens_per_trained_token"]
    print(f"ratio: {ratio:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
