"""P3: SPO vs GRPO on the toy demo task with an equal budget of generated tokens, side by side in one run.

Both arms are the ordinary trainer (``megatron_spo.trainer.loop.setup`` + ``train_step``: Megatron actor,
embedded engine, PPO-clip update) on the demo task "What is a + b?" (100 problems, reward 1 for
``\\boxed{a+b}``), from the SAME warm-started model (``megatron_spo.demo.prepare``), the same seed and
the demo config (``demo_overrides``): 64 responses per step in both arms —

- **SPO**: 64 prompts x 1 response, prioritized sampling, baseline from the per-prompt value tracker;
- **GRPO**: 8 prompts x 8 responses, group-normalised advantages.

Equal generated tokens: the SPO arm runs ``--steps`` steps; its total of generated (model) tokens
``B`` is the budget. The GRPO arm then runs until it has generated at least ``B`` tokens (at most
``2 x steps`` steps). Evaluation checkpoints are token counts: the SPO arm evaluates every
``--eval-every`` steps and records its token count there; the GRPO arm evaluates at the first step
whose cumulative token count reaches each of those counts (so the two differ by less than one
step's tokens, ~64 x 8). Evaluation is ``avg@k`` (mean reward over k samples per problem, T = 1.0,
top-p 1, the trainer's validation path) on all 100 problems; ``k = --eval-samples``.

Output: a table (per checkpoint: tokens, mean train reward since the previous checkpoint, eval
avg@k, for both arms), a PNG of train reward (moving average) and eval avg@k vs generated tokens
for both arms (``<run-dir>/spo_vs_grpo.png``), a JSON with every number, and the last line

    ratio: <SPO final eval avg@k / GRPO final eval avg@k>

i.e. how much better (> 1) or worse (< 1) SPO's policy is than GRPO's after the same number of
generated tokens. The eval estimate has a standard error of about sqrt(p(1-p)/(100 k)) per arm
(~0.017 at k = 8 and p = 0.5); the output prints the standard error of the difference.

Each arm runs in its own spawned process (megatron's parallel state is process-global), one after
the other, single process world (DP = 1). Run with ``OMP_NUM_THREADS=1``::

    OMP_NUM_THREADS=1 python bench/spo_vs_grpo.py [--steps 300 --eval-every 50 --eval-samples 8 --run-dir runs/bench_p3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from megatron_spo.fresh_process import in_fresh_process


def _eval_avg(run: Any, k: int) -> float:
    metrics = run.validator.run()
    key = next((name for name in metrics if name.startswith("eval/") and name.endswith(f"/avg@{k}")), None)
    if key is None:
        raise KeyError(f"validation returned no avg@{k} metric; got {sorted(metrics)}")
    return float(metrics[key])


def run_arm(algo: str, warm: str, data: str, run_dir: str, *, seed: int, eval_samples: int, max_steps: int,
            stop_steps: Optional[int] = None, eval_every: int = 0,
            token_checkpoints: Optional[List[float]] = None) -> Dict[str, Any]:
    """One trainer run (in a fresh process). Stops after ``stop_steps`` steps, or once the generated
    tokens reach the last of ``token_checkpoints`` (or ``max_steps``).

    Evaluates at step 0, every ``eval_every`` steps (``stop_steps`` mode), or when the cumulative
    generated tokens first reach each of ``token_checkpoints``.

    Returns ``{"steps": [{"step", "tokens", "reward"}], "evals": [{"step", "tokens", "avg"}], "seconds"}``;
    ``tokens`` = cumulative generated model tokens (``rollout/tokens_generated``), ``reward`` = the step's
    mean train reward.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from megatron_spo.config import load_config
    from megatron_spo.demo import demo_overrides
    from megatron_spo.megatron.parallel import teardown_parallel
    from megatron_spo.rollout.build import close_engine
    from megatron_spo.trainer.loop import setup, train_step

    overrides = demo_overrides(Path(run_dir), Path(warm), Path(data), algo, max_steps) + [
        f"train.seed={seed}", f"rollout.eval_samples={eval_samples}", "io.tensorboard=false"]
    run = setup(load_config(None, overrides))
    steps: List[Dict[str, float]] = []
    evals = [{"step": 0, "tokens": 0.0, "avg": _eval_avg(run, eval_samples)}]
    pending = list(token_checkpoints or [])
    tokens = 0.0
    t0 = time.monotonic()
    while run.step < max_steps:
        run.metrics = {}
        train_step(run)
        run.step += 1
        tokens += run.metrics["rollout/tokens_generated"]
        steps.append({"step": run.step, "tokens": tokens, "reward": run.metrics["reward/mean"]})
        if stop_steps is not None:
            if run.step % eval_every == 0 or run.step == stop_steps:
                evals.append({"step": run.step, "tokens": tokens, "avg": _eval_avg(run, eval_samples)})
            if run.step >= stop_steps:
                break
        else:
            if pending and tokens >= pending[0]:
                while pending and tokens >= pending[0]:
                    pending.pop(0)
                evals.append({"step": run.step, "tokens": tokens, "avg": _eval_avg(run, eval_samples)})
            if not pending:
                break
    if stop_steps is None and pending:  # the step cap hit first: evaluate where it stopped
        evals.append({"step": run.step, "tokens": tokens, "avg": _eval_avg(run, eval_samples)})
    seconds = time.monotonic() - t0
    run.validator.close()
    run.phase.close()
    close_engine(run.engine)
    teardown_parallel()
    return {"steps": steps, "evals": evals, "seconds": seconds}




def window_reward(steps: List[Dict[str, float]], lo_step: int, hi_step: int) -> float:
    """Mean train reward over steps ``lo_step < step <= hi_step`` (nan when the window is empty)."""
    vals = [s["reward"] for s in steps if lo_step < s["step"] <= hi_step]
    return sum(vals) / len(vals) if vals else float("nan")


def moving_average(values: List[float], window: int) -> List[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def table(spo: Dict[str, Any], grpo: Dict[str, Any], k: int) -> str:
    head = (f"{'ckpt':>4} | {'SPO step':>8} {'tokens':>8} {'train r':>7} {f'avg@{k}':>7} | "
            f"{'GRPO step':>9} {'tokens':>8} {'train r':>7} {f'avg@{k}':>7}")
    lines = [head, "-" * len(head)]
    n = max(len(spo["evals"]), len(grpo["evals"]))
    prev = {"spo": 0, "grpo": 0}
    for i in range(n):
        cells = []
        for name, arm in (("spo", spo), ("grpo", grpo)):
            if i < len(arm["evals"]):
                e = arm["evals"][i]
                r = window_reward(arm["steps"], prev[name], e["step"])
                prev[name] = e["step"]
                w = 8 if name == "spo" else 9
                cells.append(f"{e['step']:>{w}d} {e['tokens']:>8.0f} {r:>7.3f} {e['avg']:>7.3f}")
            else:
                cells.append(" " * 33)
        lines.append(f"{i:>4} | {cells[0]} | {cells[1]}")
    return "\n".join(lines)


def plot(spo: Dict[str, Any], grpo: Dict[str, Any], k: int, path: Path, window: int = 10) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, arm, color in (("SPO 64x1", spo, "tab:blue"), ("GRPO 8x8", grpo, "tab:orange")):
        x = [s["tokens"] for s in arm["steps"]]
        axes[0].plot(x, moving_average([s["reward"] for s in arm["steps"]], window), color=color, label=name)
        axes[1].plot([e["tokens"] for e in arm["evals"]], [e["avg"] for e in arm["evals"]], marker="o",
                     color=color, label=name)
    axes[0].set_ylabel(f"train reward ({window}-step mean)")
    axes[1].set_ylabel(f"eval avg@{k} (100 problems, T=1)")
    axes[1].set_xlabel("generated tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)  # smaller defaults; explicit flags still win
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a run of about 3 minutes: 12 SPO steps, evaluations every 6 with avg@2")
    p.add_argument("--steps", type=int, default=12 if quick else 300,
                   help="SPO steps; fixes the token budget (default 300)")
    p.add_argument("--eval-every", type=int, default=6 if quick else 50,
                   help="SPO steps between evaluations (default 50)")
    p.add_argument("--eval-samples", type=int, default=2 if quick else 8, help="k of avg@k (default 8)")
    p.add_argument("--run-dir", default="runs/bench_p3")
    p.add_argument("--warm-steps", type=int, default=110)
    p.add_argument("--warm-lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.steps < 1 or a.eval_every < 1 or a.eval_samples < 1:
        p.error("--steps, --eval-every and --eval-samples must be >= 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_spo.demo import prepare

    run_dir = Path(a.run_dir)
    warm, data = prepare(run_dir, warm_steps=a.warm_steps, warm_lr=a.warm_lr, seed=a.seed)
    common = dict(seed=a.seed, eval_samples=a.eval_samples, max_steps=2 * a.steps)
    spo = in_fresh_process(run_dir / "spo.log", run_arm, "spo", str(warm), str(data), str(run_dir / "spo"),
                      stop_steps=a.steps, eval_every=a.eval_every, **common)
    checkpoints = [e["tokens"] for e in spo["evals"][1:]]
    grpo = in_fresh_process(run_dir / "grpo.log", run_arm, "grpo", str(warm), str(data), str(run_dir / "grpo"),
                       token_checkpoints=checkpoints, **common)
    k = a.eval_samples
    print(f"SPO vs GRPO on the demo task, equal generated tokens (budget {checkpoints[-1]:.0f} = SPO's {a.steps} "
          f"steps); eval avg@{k} on 100 problems at T=1.0")
    print(table(spo, grpo, k))
    s_final, g_final = spo["evals"][-1]["avg"], grpo["evals"][-1]["avg"]
    se = math.sqrt(sum(v * (1 - v) for v in (s_final, g_final)) / (100 * k))
    print(f"final: SPO {s_final:.3f} after {spo['evals'][-1]['tokens']:.0f} tokens ({spo['seconds']:.0f} s), "
          f"GRPO {g_final:.3f} after {grpo['evals'][-1]['tokens']:.0f} tokens ({grpo['seconds']:.0f} s); "
          f"s.e. of the difference ~{se:.3f}")
    png = plot(spo, grpo, k, run_dir / "spo_vs_grpo.png")
    (run_dir / "spo_vs_grpo.json").write_text(json.dumps({"spo": spo, "grpo": grpo, "k": k}, indent=1))
    print(f"plot: {png}")
    ratio = s_final / g_final if g_final > 0 else float("inf")
    print(f"ratio: {ratio:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
