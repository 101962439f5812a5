"""Worker for tests/megatron/test_checkpoint_faults.py, run under torchrun (one process).

Saves two checkpoints of the tiny model, then corrupts them the ways a disk or a copy does and
records what loading says: a same-size corruption of a shard (caught by the manifest's checksums),
a corrupt ``common.pt`` in a checkpoint whose manifest has no checksums (written before they
existed: torch's unpickler fails, and its advice to use ``weights_only=False`` must not reach the
user), and the trainer's ``resume`` with a missing, an empty and an 'auto' path.

Usage: torchrun --nproc_per_node=1 _ckpt_fault_worker.py OUT_JSON HF_DIR ROOT
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ckpt_worker import batch, setup, train_step  # noqa: E402


def _flip(path: Path, where: float) -> None:
    """Invert 64 bytes at fraction ``where`` of the file: same size, different content."""
    data = bytearray(path.read_bytes())
    at = int(len(data) * where)
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    path.write_bytes(bytes(data))


def _error(fn) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test checks type and message
        return f"{type(err).__name__}: {err}"
    return "no error"


def main(out_path: str, hf_dir: str, root: str) -> None:
    from megatron_spo import checkpoint_dir as cdir
    from megatron_spo.megatron.checkpoint import load_checkpoint, save_checkpoint
    from megatron_spo.trainer.checkpointing import resume

    out: dict = {}
    root = Path(root)
    model, opt, sched, corpus, vocab = setup(hf_dir, 1, 0.0)
    train_step(model, opt, sched, batch(corpus, 0, vocab))  # so that the optimizer has state to save
    save_checkpoint(root, 1, model, opt, sched, caller_state={"step": 1})
    second = save_checkpoint(root, 2, model, opt, sched, caller_state={"step": 2})
    manifest = json.loads((second / cdir.MARKER).read_text())
    out["algorithm"], out["checksummed"] = manifest["checksum"], sorted(manifest["checksums"])

    shard = max((p for p in (second / "dist").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    _flip(shard, 0.9)  # tensor bytes: without a checksum this would load as weights
    out["corrupt_shard_explicit"] = _error(lambda: load_checkpoint(second, model, opt, sched))
    out["corrupt_shard_fallback_step"] = load_checkpoint(root, model, opt, sched).step

    old = root.parent / "old_style" / "step_00000001"
    shutil.copytree(root / "step_00000001", old)
    marker = json.loads((old / cdir.MARKER).read_text())
    del marker["checksums"], marker["checksum"]  # a manifest from before checksums: sizes only
    (old / cdir.MARKER).write_text(json.dumps(marker))
    out["old_style_step"] = load_checkpoint(old, model, opt, sched).step
    _flip(old / "dist" / "common.pt", 1 / 3)  # into the pickle stream: torch.load fails
    out["corrupt_common"] = _error(lambda: load_checkpoint(old, model, opt, sched))

    def trainer_resume(where: str, run_dir: Path) -> str:
        run = SimpleNamespace(cfg=SimpleNamespace(io=SimpleNamespace(resume=where, run_dir=str(run_dir))),
                              actor=SimpleNamespace(model=model, optimizer=opt, scheduler=sched))
        return _error(lambda: out.setdefault(f"resume_{where}", resume(run)))

    empty = root.parent / "empty"
    empty.mkdir()
    out["resume_missing"] = trainer_resume(str(root.parent / "nope"), empty)
    out["resume_empty"] = trainer_resume(str(empty), empty)
    out["resume_auto_fresh"] = trainer_resume("auto", empty)
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])
    import torch.distributed as dist

    dist.destroy_process_group()
