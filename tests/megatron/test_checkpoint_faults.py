"""Checkpoint faults: a same-size corruption is refused by its checksum, an unreadable file is one clear
error (never torch's ``weights_only=False`` advice), and ``io.resume`` naming a missing path is an error.

The manifest-level cases are pure filesystem (``checkpoint_dir``); the megatron ones run the tiny model
in one torchrun launch (_ckpt_fault_worker.py), as tests/megatron/test_checkpoint.py does.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_spo import checkpoint_dir as cd
from megatron_spo.models.tiny import make_tiny_model_dir

WORKER = str(Path(__file__).with_name("_ckpt_fault_worker.py"))


def _save(root, step, payload=b"x" * 100):
    tmp = cd.prepare_temp_dir(root, step)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "weights.bin").write_bytes(payload)
    (tmp / "common.pt").write_bytes(b"c" * 10)
    cd.write_manifest(tmp, step)
    return cd.publish(tmp, root, step)


def test_manifest_checksums_refuse_a_same_size_corruption(tmp_path, caplog):
    first = _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    manifest = cd.verify(second)
    assert manifest["checksum"] == cd.default_checksum() == "xxh3_64"
    assert sorted(manifest["checksums"]) == ["common.pt", "sub/weights.bin"]
    (second / "sub" / "weights.bin").write_bytes(b"x" * 50 + b"y" + b"x" * 49)   # same size, one byte changed
    assert cd.verify(second) == manifest          # sizes only (publish, prune): not read
    with pytest.raises(cd.IncompleteCheckpointError,
                       match=r"step_00000002 is corrupt: file sub/weights.bin does not match its checksum"):
        cd.verify(second, content=True)
    with pytest.raises(cd.IncompleteCheckpointError, match="does not match its checksum"):
        cd.resolve(second)                        # asked for exactly this one
    with caplog.at_level(logging.WARNING, logger="megatron_spo.checkpoint_dir"):
        assert cd.resolve(tmp_path) == first      # the root: falls back to the previous complete one
    assert "does not match its checksum" in caplog.text


def test_crc32_and_old_manifests_still_verify(tmp_path):
    d = _save(tmp_path, 1)
    manifest = json.loads((d / cd.MARKER).read_text())
    manifest["checksum"] = "crc32"
    manifest["checksums"] = cd.checksums(d, manifest["files"], "crc32")
    (d / cd.MARKER).write_text(json.dumps(manifest))
    assert cd.verify(d, content=True)["checksum"] == "crc32"
    (d / "common.pt").write_bytes(b"d" * 10)
    with pytest.raises(cd.IncompleteCheckpointError, match="file common.pt does not match its checksum"):
        cd.verify(d, content=True)
    del manifest["checksums"], manifest["checksum"]   # written before checksums existed: sizes only
    (d / cd.MARKER).write_text(json.dumps(manifest))
    assert cd.resolve(d) == d


def test_checksum_cost_per_gb(tmp_path):
    """Not a limit, a measurement (the figure quoted in checkpoint_dir's docstring): 256 MB in 4 files."""
    for i in range(4):
        (tmp_path / f"shard{i}.bin").write_bytes(os.urandom(64 << 20))
    start = time.perf_counter()
    cd.checksums(tmp_path, [f"shard{i}.bin" for i in range(4)], "xxh3_64")
    per_gb = (time.perf_counter() - start) * 4
    print(f"checksum: {per_gb:.2f} s per GB (files in the page cache)")
    assert per_gb < 30


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_faults")
    hf = str(make_tiny_model_dir(tmp / "hf", "qwen3"))
    out = tmp / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", WORKER, str(out), hf,
           str(tmp / "run" / "checkpoints")]
    log = tmp / "worker.log"
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=fh, stderr=subprocess.STDOUT,
                              timeout=600)
    assert proc.returncode == 0, log.read_text()[-6000:]
    return json.loads(out.read_text()), tmp


def test_corrupt_shard_is_refused_by_its_checksum(faults):
    out, _ = faults
    assert out["algorithm"] == "xxh3_64" and "dist/common.pt" in out["checksummed"]
    assert out["corrupt_shard_explicit"].startswith("IncompleteCheckpointError: checkpoint ")
    assert "step_00000002 is corrupt: file dist/__0_" in out["corrupt_shard_explicit"]
    assert "does not match its checksum" in out["corrupt_shard_explicit"]
    assert out["corrupt_shard_fallback_step"] == 1


def test_unreadable_file_is_named_without_torchs_weights_only_advice(faults):
    out, _ = faults
    assert out["old_style_step"] == 1
    message = out["corrupt_common"]
    assert message.startswith("UnreadableCheckpointError: checkpoint ") and "old_style/step_00000001/dist/common.pt" \
        in message, message
    assert "weights_only" not in message and "\n" not in message


def test_resume_path_that_does_not_exist_is_an_error(faults):
    out, tmp = faults
    assert out["resume_missing"] == f"NoCheckpointError: io.resume={str(tmp / 'run' / 'nope')!r}: " \
                                    f"{tmp / 'run' / 'nope'} does not exist"
    assert out["resume_empty"] == f"NoCheckpointError: io.resume={str(tmp / 'run' / 'empty')!r}: " \
                                  f"no checkpoint under {tmp / 'run' / 'empty'}"
    assert out["resume_auto_fresh"] == "no error" and out["resume_auto"] is False   # 'auto' with none yet: fresh


class _NotAllowed:
    """A class torch's weights-only unpickler refuses."""


def test_torch_weights_only_refusal_is_reported_without_its_advice(faults, tmp_path):
    import shutil

    import torch

    from megatron_spo.megatron.checkpoint import _common_state

    _, tmp = faults
    copy = tmp_path / "step_00000001"
    shutil.copytree(tmp / "run" / "checkpoints" / "step_00000001", copy)
    torch.save({"common": {"format": 1}, "x": _NotAllowed()}, copy / "dist" / "common.pt")
    with pytest.raises(cd.UnreadableCheckpointError) as err:
        _common_state(copy)
    assert str(err.value) == (f"checkpoint {copy / 'dist' / 'common.pt'}: cannot be read (UnpicklingError: not a valid "
                              f"torch file); the file is corrupt or not written by megatron_spo")
