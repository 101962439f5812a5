"""Streaming HF export throughput vs plain memcpy bandwidth, measured side by side in one run.

A Qwen3-shaped Megatron model (fp32, TP=1, one process; default ~130 MB of weights) is exported
with ``megatron_spo.megatron.export.export_hf_weights`` the way a weight-sync sender consumes it:
every bucket is packed into one contiguous byte buffer (the payload one would broadcast or hand to
an engine). That includes the mapping work (QKV de-interleave, gate/up split: strided copies) and
the per-tensor Python overhead. The baseline copies the same number of bytes from the model's
parameters into the same buffer (``Tensor.copy_`` of contiguous memory: plain memcpy bandwidth).
Both run ``--repeats`` times, interleaved; the best time of each is used.

Usage: python bench/export_throughput.py [--hidden 512] [--layers 8] [--vocab 8192] [--bucket-mb 64]
The last line is ``ratio: <export bytes/s / memcpy bytes/s>`` (target >= 0.5).
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    quick = "--quick" in sys.argv[1:]  # smaller defaults; flags given explicitly still win
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="a run well under 3 minutes: 4 layers, 1 repeat")
    ap.add_argument("--layers", type=int, default=4 if quick else 8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1 if quick else 3)
    args = ap.parse_args()

    import torch

    from megatron_spo.megatron.export import export_hf_weights
    from megatron_spo.megatron.model import build_model
    from megatron_spo.megatron.parallel import ParallelSizes, initialize_parallel, teardown_parallel
    from megatron_spo.models.tiny import tiny_config

    heads = args.hidden // 64
    cfg = tiny_config("qwen3", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      head_dim=64).to_dict()
    initialize_parallel(ParallelSizes(), hf_config=cfg)
    (model,) = build_model(cfg)
    params = [p.detach() for p in model.parameters()]
    total = sum(p.numel() * p.element_size() for p in params)
    budget = args.bucket_mb << 20
    buf = torch.empty(max(total, budget), dtype=torch.uint8)

    def export_once() -> int:
        nbytes = 0
        for bucket in export_hf_weights(model, cfg, bucket_bytes=budget):
            off = 0
            for _, t in bucket:  # pack the bucket: what a sender puts on the wire
                n = t.numel() * t.element_size()
                buf[off:off + n].view(t.dtype).view(t.shape).copy_(t)
                off += n
            nbytes += off
        return nbytes

    def memcpy_once() -> int:
        off = 0
        for p in params:
            n = p.numel() * p.element_size()
            buf[off:off + n].view(p.dtype).view(p.shape).copy_(p)
            off += n
        return off

    export_once(), memcpy_once()  # warm up (page faults in buf)
    best = {"export": float("inf"), "memcpy": float("inf")}
    sizes = {}
    for _ in range(args.repeats):
        for name, fn in (("export", export_once), ("memcpy", memcpy_once)):
            t0 = time.perf_counter()
            sizes[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    teardown_parallel()

    rate = {k: sizes[k] / best[k] for k in best}
    print(f"model: qwen3-shaped, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{total / 2**20:.1f} MiB fp32; bucket {args.bucket_mb} MiB; best of {args.repeats}")
    print(f"{'side':<8} {'bytes':>12} {'seconds':>9} {'GB/s':>7}")
    for k in ("export", "memcpy"):
        print(f"{k:<8} {sizes[k]:>12} {best[k]:>9.4f} {rate[k] / 1e9:>7.2f}")
    # The export yields HF tensors: same bytes as the parameters (no vocab padding at TP=1).
    assert sizes["export"] == sizes["memcpy"] == total, sizes
    print(f"ratio: {rate['export'] / rate['memcpy']:.3f}")


if __name__ == "__main__":
    main()
