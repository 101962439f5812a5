"""P6: embedded engine tokens/s vs transformers ``generate`` on the same tiny model, side by side.

Model: random Qwen3 as in docs/engine_contracts.md §3 (2 layers, hidden 256, 4/2 heads of dim 64,
FFN 768, fp32), tokenizer vocab ~512. Workload: 32 left-padded prompts of 16-48 tokens, 128 sampled
tokens each (eos ignored), temperature 1. Both sides run in this process, alternating, best of
``--repeats``. ``generate`` is timed twice: plain (no log-probs: an upper bound on its speed), and
with ``output_logits=True`` + the log-prob gather an RL engine needs. The headline ratio is
embedded / plain generate (the stricter comparison).

Run: ``OMP_NUM_THREADS=1 python bench/embedded_vs_generate.py``; the last line is ``ratio: <x>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv  # smaller defaults; flags given explicitly still win
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run of well under 3 minutes: 32 new tokens, 1 repeat")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32 if quick else 128)
    ap.add_argument("--repeats", type=int, default=1 if quick else 3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; on shared, busy cores more than 1 makes OpenMP thrash and timings meaningless")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megatron_spo.models.tiny import make_tiny_model_dir
    from megatron_spo.rollout.embedded.engine import EmbeddedEngine
    from megatron_spo.rollout.engine import SamplingParams

    tmp = tempfile.mkdtemp(prefix="p6_")
    model_dir = str(make_tiny_model_dir(tmp, "qwen3", hidden_size=256, intermediate_size=768, head_dim=64,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    engine = EmbeddedEngine(model_dir, max_batch=args.batch)
    model = engine.model  # generate runs on the very same module
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, engine.vocab_size, (int(torch.randint(16, 49, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(args.batch)]
    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True)

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), engine.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    def run_embedded() -> int:
        out = engine.generate(prompts, sp)
        return sum(len(r.token_ids) for r in out)

    def run_generate(with_logprobs: bool) -> int:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=engine.pad_id, return_dict_in_generate=True,
                                 output_logits=with_logprobs)
            new = out.sequences[:, width:]
            if with_logprobs:
                lp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, new[..., None])
                assert lp.shape[:2] == new.shape
        return new.numel()

    sides = {"embedded engine": run_embedded, "generate (plain)": lambda: run_generate(False),
             "generate + logprobs": lambda: run_generate(True)}
    for fn in sides.values():  # warm-up
        fn()
    best = {k: 0.0 for k in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            n = fn()
            best[name] = max(best[name], n / (time.perf_counter() - t0))
    print(f"model: qwen3 tiny, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, vocab "
          f"{engine.vocab_size}, fp32, {args.threads} threads; batch {args.batch} x {args.new_tokens} new tokens")
    print(f"{'side':<22}{'tok/s (best of ' + str(args.repeats) + ')':>24}")
    for name, v in best.items():
        print(f"{name:<22}{v:>24.0f}")
    print(f"embedded / (generate + logprobs): {best['embedded engine'] / best['generate + logprobs']:.3f}")
    print(f"ratio: {best['embedded engine'] / best['generate (plain)']:.3f}")
    engine.close()


if __name__ == "__main__":
    main()
