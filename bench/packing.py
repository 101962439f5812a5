"""P9: computed tokens / real tokens and wall time of the actor, padded vs padding-free packed micro-batches.

One process builds a small Qwen3 (random weights, 1024+ positions) and a batch of sequences whose
lengths are spread uniformly over 64..1024, then runs the same actor step twice — ``packing=False``
(micro-batches of similar-length rows padded to their longest) and ``packing=True`` (rows of
concatenated sequences, block-diagonal causal mask on the local spec) — with the same token budget:

* computed tokens = Σ over micro-batches of the model input's rows x width; real = Σ lengths;
* wall time of ``score`` (forward only) and ``forward_backward`` (best of ``--repeats``);
* |loss packed - loss padded| and max |logp packed - logp padded| (the two paths must agree).

Usage: OMP_NUM_THREADS=2 python bench/packing.py [--quick] [--sequences 128] [--budget 16384]
``--quick`` (<= 3 minutes on 2 cores): 32 sequences, budget 4096, a 2-layer hidden-128 model.
The last line is ``ratio: <computed / real tokens, packed>`` (target <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path


def make_batch(n: int, lo: int, hi: int, vocab: int, seed: int):
    """``n`` sequences, lengths uniform in [lo, hi], loss on every token after the first 16 (the "prompt")."""
    import torch

    rng = random.Random(seed)
    lengths = torch.tensor([rng.randint(lo, hi) for _ in range(n)])
    width = int(lengths.max())
    g = torch.Generator().manual_seed(seed)
    ar = torch.arange(width).unsqueeze(0)
    mask = ((ar >= 16) & (ar < lengths.unsqueeze(1))).float()
    return {"input_ids": torch.randint(0, vocab, (n, width), generator=g), "lengths": lengths, "loss_mask": mask,
            "old_logp": (-torch.rand(n, width, generator=g) - 6.0) * mask,
            "advantages": torch.randn(n, 1, generator=g).expand(n, width).contiguous()}


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _side(hf_dir: str, batch, budget: int, packing: bool, repeats: int) -> dict:
    import torch

    from megatron_spo.megatron.actor import LossSettings, MegatronActor
    from megatron_spo.megatron.export import load_hf_weights
    from megatron_spo.megatron.model import load_hf_config
    from megatron_spo.megatron.optimizer import OptimSettings
    from megatron_spo.megatron.packing import computed_tokens
    from megatron_spo.megatron.parallel import ParallelSizes, initialize_parallel, teardown_parallel

    cfg = load_hf_config(hf_dir)
    initialize_parallel(ParallelSizes(), hf_config=cfg, seed=1)
    actor = MegatronActor(cfg, optim=OptimSettings(lr=1e-3, optimizer="sgd", clip_grad=0.0),
                          loss=LossSettings(name="ppo"), micro_batch_tokens=budget, packing=packing)
    load_hf_weights(actor.model, hf_dir)
    mbs = actor.micro_batches(batch)
    out = {"micro_batches": len(mbs), "computed_tokens": sum(computed_tokens(mb) for mb in mbs),
           "shapes": [list(mb.get("packed_ids", mb["input_ids"]).shape) for mb in mbs]}
    scored = {}
    out["score_s"] = _best(lambda: scored.update(actor.score(batch)), repeats)
    metrics = {}
    out["train_s"] = _best(lambda: metrics.update(actor.forward_backward(batch)), repeats)
    out["loss"] = float(metrics["loss"])
    out["logp"] = scored["logp"]
    teardown_parallel(destroy_process_group=False)
    torch.distributed.barrier()
    return out


def _worker(args) -> dict:
    import torch

    from megatron_spo.models.tiny import make_tiny_model_dir

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = str(make_tiny_model_dir(Path(tmp) / "qwen3", "qwen3", seed=0, tokenizer=False,
                                         vocab_size=args.vocab, hidden_size=args.hidden,
                                         intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                                         num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 64,
                                         head_dim=32, max_position_embeddings=max(1024, args.max_len)))
        batch = make_batch(args.sequences, args.min_len, args.max_len, args.vocab, args.seed)
        res = {side: _side(hf_dir, batch, args.budget, side == "packed", args.repeats) for side in ("padded", "packed")}
    real = int(batch["lengths"].sum())
    valid = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0) < batch["lengths"].unsqueeze(1)
    logp_diff = float(((res["packed"].pop("logp") - res["padded"].pop("logp")).abs() * valid).max())
    return {"real_tokens": real, "logp_max_abs_diff": logp_diff,
            "loss_abs_diff": abs(res["packed"]["loss"] - res["padded"]["loss"]), **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 sequences, budget 4096, 2 layers of hidden 128")
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--budget", type=int, default=16384, help="train.micro_batch_tokens")
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.sequences, args.budget, args.hidden, args.layers, args.repeats = 32, 4096, 128, 2, 1

    from megatron_spo.megatron.launch import run_distributed

    res = run_distributed(_worker, 1, args=(args,), timeout=3600)[0]
    real = res["real_tokens"]
    print(f"{args.sequences} sequences, lengths {args.min_len}..{args.max_len}, {real} real tokens, "
          f"budget {args.budget}, qwen3 {args.layers} layers x hidden {args.hidden}")
    print(f"{'side':8} {'micro-batches':>13} {'computed':>9} {'computed/real':>13} {'score s':>8} {'train s':>8}")
    for side in ("padded", "packed"):
        r = res[side]
        print(f"{side:8} {r['micro_batches']:>13} {r['computed_tokens']:>9} {r['computed_tokens'] / real:>13.4f} "
              f"{r['score_s']:>8.2f} {r['train_s']:>8.2f}")
    pad, pack = res["padded"], res["packed"]
    print(f"time packed / padded: score {pack['score_s'] / pad['score_s']:.3f}, "
          f"forward+backward {pack['train_s'] / pad['train_s']:.3f}")
    print(f"parity: |loss diff| {res['loss_abs_diff']:.2e}, max |logp diff| {res['logp_max_abs_diff']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"ratio: {pack['computed_tokens'] / real:.4f}")


if __name__ == "__main__":
    main()
