"""Atomic checkpoint directories (pure filesystem logic, no megatron)."""

from __future__ import annotations

import logging

import pytest

from megatron_spo import checkpoint_dir as cd


def _save(root, step, payload=b"x" * 100):
    tmp = cd.prepare_temp_dir(root, step)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "weights.bin").write_bytes(payload)
    (tmp / "common.pt").write_bytes(b"c" * 10)
    cd.write_manifest(tmp, step, meta={"world_size": 1})
    return cd.publish(tmp, root, step)


def test_publish_writes_manifest_and_latest_last(tmp_path):
    final = _save(tmp_path, 3)
    assert final.name == "step_00000003"
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"
    manifest = cd.verify(final)
    assert manifest["files"] == {"common.pt": 10, "sub/weights.bin": 100}
    assert manifest["step"] == 3 and manifest["meta"] == {"world_size": 1}
    assert not cd.temp_dir_for(tmp_path, 3).exists()
    assert cd.resolve(tmp_path) == final


def test_interrupted_save_is_invisible(tmp_path):
    good = _save(tmp_path, 3)
    tmp = cd.prepare_temp_dir(tmp_path, 4)  # killed before the manifest: only a .tmp- dir remains
    (tmp / "common.pt").write_bytes(b"partial")
    assert cd.resolve(tmp_path) == good
    assert cd.list_published(tmp_path) == [(3, good)]


def test_truncated_checkpoint_is_refused_and_previous_used(tmp_path, caplog):
    first = _save(tmp_path, 3)
    second = _save(tmp_path, 6)
    with open(second / "sub" / "weights.bin", "r+b") as fh:
        fh.truncate(40)
    with pytest.raises(cd.IncompleteCheckpointError, match=r"sub/weights.bin has 40 bytes, the manifest says 100"):
        cd.verify(second)
    with pytest.raises(cd.IncompleteCheckpointError, match="truncated"):
        cd.resolve(second)  # asked for this exact directory: refuse, do not guess
    with caplog.at_level(logging.WARNING, logger="megatron_spo.checkpoint_dir"):
        assert cd.resolve(tmp_path) == first
    assert "refusing checkpoint" in caplog.text and "step_00000006" in caplog.text


def test_missing_marker_and_missing_file_are_named(tmp_path):
    d = _save(tmp_path, 1)
    (d / "common.pt").unlink()
    with pytest.raises(cd.IncompleteCheckpointError, match="file common.pt is missing"):
        cd.verify(d)
    (d / cd.MARKER).unlink()
    with pytest.raises(cd.IncompleteCheckpointError, match="no COMPLETE.json"):
        cd.verify(d)
    with pytest.raises(cd.NoCheckpointError, match="no complete checkpoint.*refused"):
        cd.resolve(tmp_path)
    with pytest.raises(cd.NoCheckpointError):
        cd.find_resumable(tmp_path)  # checkpoints exist but none is usable: not a fresh start
    assert cd.find_resumable(tmp_path / "empty") is None


def test_latest_pointer_wins_and_falls_back(tmp_path):
    a, b = _save(tmp_path, 1), _save(tmp_path, 2)
    (tmp_path / "latest").write_text(a.name)  # e.g. an operator rolled back on purpose
    assert cd.resolve(tmp_path) == a
    (tmp_path / "latest").write_text("garbage")
    assert cd.resolve(tmp_path) == b


def test_keep_last_n(tmp_path):
    dirs = [_save(tmp_path, s) for s in (1, 2, 3, 4)]
    stale = cd.prepare_temp_dir(tmp_path, 9)
    deleted = cd.prune(tmp_path, keep_last=2)
    assert set(deleted) == {dirs[0], dirs[1], stale}
    assert [s for s, _ in cd.list_published(tmp_path)] == [3, 4]
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        cd.prune(tmp_path, 0)


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 5, payload=b"a" * 10)
    final = _save(tmp_path, 5, payload=b"b" * 20)
    assert (final / "sub" / "weights.bin").read_bytes() == b"b" * 20
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
