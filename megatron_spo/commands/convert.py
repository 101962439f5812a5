"""``megatron-spo convert``: HF directory <-> Megatron dist checkpoint, runnable under torchrun.

    torchrun --nproc_per_node=2 -m megatron_spo.commands.convert hf-to-mcore --hf DIR --out CKPT --tp 2
    torchrun --nproc_per_node=1 -m megatron_spo.commands.convert mcore-to-hf --ckpt CKPT --out HF_DIR

(or ``megatron-spo convert ...``). Without torchrun a single
process is used. ``hf-to-mcore`` writes a trainer-checkpoint root (``CKPT/step_00000000`` with the
model only, plus ``hf/`` config and tokenizer files, published atomically), which the trainer can
also load directly; ``mcore-to-hf`` reads such a root, a step directory, or a trainer checkpoint
(the optimizer part is skipped) at any layout and writes safetensors + config + tokenizer that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. Both directions go through the same
mapping and the same streaming export the rollout weight sync uses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")
    p.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``convert {hf-to-mcore,mcore-to-hf}`` to a ``megatron-spo`` sub-command parser."""
    conv = subparsers.add_parser("convert", help="convert checkpoints between HF and Megatron",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = conv.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    h2m = sub.add_parser("hf-to-mcore", help="HF directory -> Megatron dist checkpoint at a TP/PP/EP layout")
    h2m.add_argument("--hf", required=True, type=Path, help="HF model directory (config.json + safetensors)")
    h2m.add_argument("--out", required=True, type=Path, help="checkpoint root to create")
    h2m.add_argument("--params-dtype", choices=["fp32", "bf16"], default="fp32", help="Megatron parameter dtype")
    _parallel_args(h2m)
    h2m.set_defaults(func=hf_to_mcore)

    m2h = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF safetensors + config + tokenizer")
    m2h.add_argument("--ckpt", required=True, type=Path, help="checkpoint root (uses `latest`) or a step directory")
    m2h.add_argument("--out", required=True, type=Path, help="HF output directory")
    m2h.add_argument("--hf-config", type=Path, default=None,
                     help="directory with config.json/tokenizer (default: the checkpoint's hf/ copy)")
    m2h.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast exported tensors (default: as stored)")
    m2h.add_argument("--max-shard-gb", type=float, default=4.0, help="safetensors shard size (GiB)")
    m2h.add_argument("--bucket-mb", type=int, default=512, help="streaming export bucket budget (MiB)")
    _parallel_args(m2h)
    m2h.set_defaults(func=mcore_to_hf)
    return conv


def _init(args, hf_config):
    import torch.distributed as dist

    from megatron_spo.megatron.parallel import ParallelSizes, initialize_parallel

    initialize_parallel(ParallelSizes(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp), hf_config=hf_config)
    return dist.get_rank()


def _bar(rank: int, total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=rank != 0, file=sys.stderr)


def hf_to_mcore(args) -> int:
    import torch

    from megatron_spo.megatron.checkpoint import save_checkpoint
    from megatron_spo.megatron.export import load_hf_weights
    from megatron_spo.megatron.model import build_model, load_hf_config

    cfg = load_hf_config(args.hf)
    rank = _init(args, cfg)
    dtype = torch.bfloat16 if args.params_dtype == "bf16" else torch.float32
    chunks = build_model(cfg, params_dtype=dtype)
    n_local = sum(1 for c in chunks for _ in c.parameters())
    with _bar(rank, n_local, "load HF (rank 0 shard)", "param") as bar:
        load_hf_weights(chunks, str(args.hf), cfg, progress=lambda _name: bar.update(1))
    path = save_checkpoint(args.out, 0, chunks, caller_state={"converted_from": str(args.hf)}, hf_dir=args.hf)
    if rank == 0:
        print(f"wrote {path} (tp={args.tp} pp={args.pp} ep={args.ep})", file=sys.stderr)
    return 0


def mcore_to_hf(args) -> int:
    import torch

    from megatron_spo import checkpoint_dir as cdir
    from megatron_spo.convert.hf_io import SafetensorsWriter, copy_hf_metadata
    from megatron_spo.megatron.checkpoint import load_checkpoint
    from megatron_spo.megatron.export import export_hf_weights, num_hf_tensors
    from megatron_spo.megatron.model import build_model, load_hf_config

    step_dir = cdir.resolve(args.ckpt)  # every rank reads the same manifest; load_checkpoint re-checks
    hf_dir = args.hf_config or step_dir / "hf"
    if not (Path(hf_dir) / "config.json").is_file():
        raise SystemExit(f"no config.json in {hf_dir}; pass --hf-config with the model's HF config directory")
    cfg = load_hf_config(hf_dir)
    rank = _init(args, cfg)
    stored = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    chunks = build_model(cfg, params_dtype=torch.bfloat16 if stored == torch.bfloat16 else torch.float32)
    load_checkpoint(step_dir, chunks, restore_rng=False)
    cast = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    writer = SafetensorsWriter(args.out, max_shard_bytes=int(args.max_shard_gb * (1 << 30))) if rank == 0 else None
    with _bar(rank, num_hf_tensors(cfg), "export HF", "tensor") as bar:
        for bucket in export_hf_weights(chunks, cfg, bucket_bytes=args.bucket_mb << 20, dtype=cast):
            if writer is not None:
                writer.add_many(bucket)
            bar.update(len(bucket))
    if rank == 0:
        files = writer.close()
        copy_hf_metadata(hf_dir, args.out)
        print(f"wrote {args.out} ({len(files)} safetensors file(s), {writer.total_bytes / 2**20:.1f} MiB)",
              file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_spo.commands.convert")
    sub = parser.add_subparsers(dest="command")
    conv = register(sub)
    # `python -m megatron_spo.commands.convert hf-to-mcore ...` == `megatron-spo convert hf-to-mcore ...`
    args = conv.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    finally:
        from megatron_spo.megatron.parallel import teardown_parallel

        teardown_parallel()


if __name__ == "__main__":  # required: dist_checkpointing's writer starts a multiprocessing manager
    sys.exit(main())
