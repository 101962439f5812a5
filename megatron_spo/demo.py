"""``megatron-spo demo``: a real SPO (or GRPO, SPO-chain, SPO-tree) training run on CPU that finishes in minutes.

The task is verifiable and small: "What is a + b?" for single digits a, b (100 prompts), answered as
``\\boxed{a+b}``. The policy is a tiny Qwen3 built from a config (random weights, nothing is
downloaded), given a short supervised warm start on the answer format, so that it starts well below
the ceiling (about 0.1-0.3 reward at temperature 1) and RL has something to learn. Then the
ordinary trainer runs (``megatron_spo.train``: Megatron actor, embedded engine, SPO tracker and
sampler), and the run directory gets ``metrics.jsonl``, tensorboard events and ``metrics.png``.

The warm start is a plain teacher-forced cross-entropy loop over the HF model: it is scaffolding
that makes a random model usable for the demo, not part of the RL framework.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import List, Tuple

import torch

DEMO_REWARD = "megatron_spo.demo:boxed_match"


def boxed_match(response: str, ground_truth) -> float:
    """1.0 if the last ``\\boxed{...}`` in ``response`` equals the answer (whitespace stripped), else 0."""
    from megatron_spo.rollout.rewards import last_boxed

    box = last_boxed(response)
    return 1.0 if box is not None and box.strip() == str(ground_truth).strip() else 0.0


def problems() -> List[Tuple[str, str]]:
    return [(f"What is {a} + {b}?", str(a + b)) for a in range(10) for b in range(10)]


def write_dataset(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in problems()))
    return path


def warm_start(base_dir: Path, out_dir: Path, *, steps: int, lr: float, batch: int = 32, seed: int = 0) -> Path:
    """Teacher-forced cross-entropy on ``\\boxed{answer}<|im_end|>`` for ``steps`` steps; saves to ``out_dir``.

    The loss is the mean over answer tokens of the batch.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    eos = tok.eos_token
    rows = []
    for q, a in problems():
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        p_ids = tok.encode(prompt, add_special_tokens=False)
        t_ids = tok.encode(f"\\boxed{{{a}}}{eos}", add_special_tokens=False)
        rows.append((p_ids, t_ids))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        picked = rng.sample(rows, batch)
        width = max(len(p) + len(t) for p, t in picked)
        ids = torch.full((batch, width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        attn = torch.zeros((batch, width), dtype=torch.long)
        for i, (p, t) in enumerate(picked):
            seq = p + t
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p): len(seq)] = torch.tensor(t)
            attn[i, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def demo_overrides(run_dir: Path, model_dir: Path, data: Path, algo: str, steps: int) -> List[str]:
    """The config of the demo run (everything else is the default tree)."""
    out = [
        f"model.path={model_dir}", f"data.train_path={data}", f"data.reward={DEMO_REWARD}",
        f"io.run_dir={run_dir / 'train'}", f"train.steps={steps}", "train.updates_per_step=4",
        "train.save_every=50", "train.micro_batch_tokens=4096", "rollout.max_response_len=8",
        "rollout.max_concurrency=64", "model.max_seq_len=256", "optim.lr=1e-3", "optim.lr_schedule=cosine", "optim.min_lr=1e-4",
        "optim.clip_grad=1.0",
        "algo.spo.pool_size=100", "io.tensorboard=true",
        # validation on all 100 problems at the training temperature: the honest "did it learn" curve
        f"data.eval_paths=[{data}]", "rollout.eval_temperature=1.0", "rollout.eval_top_p=1.0",
        "rollout.eval_top_k=-1", "rollout.eval_samples=8", "train.eval_every=50",
    ]
    if algo == "spo":
        out += ["algo.advantage=spo", "train.prompts_per_step=64"]
    elif algo == "spo_chain":
        # fewer responses: each cut's continuations are generated tokens too; one update per step, because
        # only low-probability tokens train and a small mini-batch may have none (trainer/segment_chain.py)
        out += ["algo.advantage=spo_chain", "train.prompts_per_step=16", "train.updates_per_step=1",
                "algo.segment.cutpoint_interval=2", "algo.segment.mc_rollouts=4"]
    elif algo == "spo_tree":  # a 4-4 tree of 3-token segments per prompt; one update per step, as for spo_chain
        out += ["algo.advantage=spo_tree", "train.prompts_per_step=8", "train.updates_per_step=1",
                "algo.segment.branching=[4,4]", "algo.segment.segment_len=3"]
    else:  # equal responses per step: 8 prompts x 8 samples
        out += ["algo.advantage=grpo", "algo.grpo.n=8", "train.prompts_per_step=8"]
    return out


def prepare(run_dir: Path, *, warm_steps: int, warm_lr: float, seed: int = 0) -> Tuple[Path, Path]:
    """Build (or reuse) the tiny base model, the warm-started model and the dataset under ``run_dir``."""
    from megatron_spo.models.tiny import make_tiny_model_dir

    data = write_dataset(run_dir / "data" / "train.jsonl")
    warm = run_dir / "warm_model"
    if not (warm / "config.json").exists():
        base = make_tiny_model_dir(run_dir / "base_model", "qwen3", seed=seed)
        print(f"warm start: {warm_steps} supervised steps on the answer format ...", flush=True)
        warm_start(base, warm, steps=warm_steps, lr=warm_lr, seed=seed)
    return warm, data


def main(args: argparse.Namespace) -> int:
    from megatron_spo.config import load_config
    from megatron_spo.trainer.loop import train
    from megatron_spo.trainer.metrics_log import read_metrics

    run_dir = Path(args.run_dir)
    warm, data = prepare(run_dir, warm_steps=args.warm_steps, warm_lr=args.warm_lr, seed=args.seed)
    overrides = demo_overrides(run_dir, warm, data, args.algo, args.steps) + list(args.overrides)
    cfg = load_config(None, overrides)
    code = train(cfg)
    metric = f"eval/train/avg@{cfg.rollout.eval_samples}"
    curve = [(r["step"], r[metric]) for r in read_metrics(run_dir / "train" / "metrics.jsonl") if metric in r]
    if curve:
        k = cfg.rollout.eval_samples
        print(f"eval avg@{k} on all {len(problems())} problems (T=1.0): {curve[0][1]:.3f} at the start -> "
              f"{curve[-1][1]:.3f} after step {curve[-1][0] + 1}", flush=True)
    return code


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train a tiny model with SPO (GRPO, SPO-chain, SPO-tree) on toy arithmetic, on CPU, in minutes")
    parser.add_argument("--algo", choices=("spo", "grpo", "spo_chain", "spo_tree"), default="spo",
                        help="advantage estimator (default spo)")
    parser.add_argument("--steps", type=int, default=300, help="RL steps (default 300)")
    parser.add_argument("--run-dir", default="runs/demo", help="where models, data and metrics go")
    parser.add_argument("--warm-steps", type=int, default=110, help="supervised warm-start steps (default 110)")
    parser.add_argument("--warm-lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for the RL run, repeatable")
    parser.set_defaults(func=main)

