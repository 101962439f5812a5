"""Atomic checkpoint directories: temp dir -> manifest -> rename -> ``latest`` pointer, keep-last-N.

Layout under a checkpoint root::

    root/
      step_00000010/        a published checkpoint; COMPLETE.json lists every file and its size
      step_00000020/
      .tmp-step_00000030/   being written (or left by a killed run; never read, removed later)
      latest                text file naming the newest published directory, written last

A save writes everything into ``.tmp-step_N``, then (one process) writes ``COMPLETE.json`` (the
manifest, itself written to a temp file and renamed), renames the directory to ``step_N`` and only
then replaces ``latest``. A process killed at any point leaves either a ``.tmp-`` directory (ignored)
or a complete, published checkpoint. On load, a directory whose manifest is missing or whose files
are missing, of the wrong size (e.g. truncated by a full disk or a partial copy) or whose content
does not match its checksum (a same-size corruption) is refused with a message naming the file, and
the previous complete checkpoint is used.

The manifest holds each file's size and a checksum (``xxh3_64`` of xxhash, which ``datasets``
requires; ``crc32`` where it is missing), computed on several threads by the process writing the
manifest: 0.3-1.3 s per GB measured on a 2-core machine with the files in the page cache, against
about 15 s per GB to write and fsync them there. A load reads every byte again to verify them
(the same cost); listing, publishing and pruning compare sizes only. A manifest without checksums
(written before they existed) is verified by sizes.

Pure filesystem code: no torch.distributed; the caller runs the one-process steps on rank 0
between barriers, on a filesystem all ranks share.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

MARKER = "COMPLETE.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step_(\d+)$")

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint directory is missing its completion marker, or a file is missing or truncated."""


class NoCheckpointError(FileNotFoundError):
    """No complete checkpoint exists under a root."""


class UnreadableCheckpointError(IncompleteCheckpointError):
    """A checkpoint's files are all there but cannot be read back (corrupt, or not a checkpoint of this code)."""


_CHUNK = 16 << 20  # bytes read per update: large enough to release the GIL for most of the hashing
_HASH_THREADS = 8


def _hasher(algorithm: str) -> Tuple[Callable[[], Any], Callable[[Any, bytes], Any], Callable[[Any], str]]:
    """(new, update, hexdigest) of ``algorithm``; crc32 state is a plain int."""
    if algorithm == "xxh3_64":
        import xxhash

        return xxhash.xxh3_64, lambda h, b: (h.update(b), h)[1], lambda h: h.hexdigest()
    if algorithm == "crc32":
        return lambda: 0, lambda h, b: zlib.crc32(b, h), lambda h: f"{h:08x}"
    raise IncompleteCheckpointError(f"unknown checksum algorithm {algorithm!r} in the manifest")


def default_checksum() -> str:
    """``xxh3_64`` when xxhash is importable (``datasets`` depends on it), else ``crc32``."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


def file_checksum(path: PathLike, algorithm: str) -> str:
    """The hex checksum of a file's bytes."""
    new, update, hexdigest = _hasher(algorithm)
    h = new()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h = update(h, block)
    return hexdigest(h)


def checksums(directory: Path, names: Iterable[str], algorithm: str) -> Dict[str, str]:
    """``{relative name: checksum}`` of files under ``directory``, hashed on several threads."""
    names = list(names)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(_HASH_THREADS, len(names)))) as pool:
        sums = pool.map(lambda rel: file_checksum(directory / rel, algorithm), names)
        return dict(zip(names, sums))


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step_{step:08d}"


def temp_dir_for(root: PathLike, step: int) -> Path:
    """The temporary directory a save of ``step`` writes into (same name on every rank)."""
    return Path(root) / f"{TMP_PREFIX}{step_dir_name(step)}"


def prepare_temp_dir(root: PathLike, step: int) -> Path:
    """Create an empty temp dir for ``step`` (removing a stale one left by a killed run). One process."""
    tmp = temp_dir_for(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _manifest_files(directory: Path) -> Dict[str, int]:
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MARKER:
            files[p.relative_to(directory).as_posix()] = p.stat().st_size
    return files


def write_manifest(directory: PathLike, step: int, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``COMPLETE.json`` listing every file of ``directory`` (relative path -> bytes, and its checksum).
    One process, last."""
    directory = Path(directory)
    for p in directory.rglob("*"):  # flush file contents before the marker claims they are complete
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    files = _manifest_files(directory)
    algorithm = default_checksum()
    manifest = {"step": int(step), "time": time.time(), "files": files, "meta": meta or {},
                "checksum": algorithm, "checksums": checksums(directory, files, algorithm)}
    _write_atomic(directory / MARKER, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify(directory: PathLike, *, content: bool = False) -> Dict[str, Any]:
    """Return the manifest of a complete checkpoint directory.

    ``content=True`` also reads every file and compares its checksum with the manifest's (what a load
    does); otherwise only sizes are compared.

    Raises:
        IncompleteCheckpointError: naming the directory and the first problem found (no marker,
            unreadable marker, a listed file missing, a file whose size differs, or, with ``content``,
            whose checksum differs).
    """
    directory = Path(directory)
    marker = directory / MARKER
    if not directory.is_dir():
        raise IncompleteCheckpointError(f"checkpoint {directory} does not exist")
    if not marker.is_file():
        raise IncompleteCheckpointError(
            f"checkpoint {directory} is incomplete: no {MARKER} (the save was interrupted or the copy is partial)")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise IncompleteCheckpointError(f"checkpoint {directory}: {MARKER} is unreadable ({err})") from err
    for rel, size in files.items():
        p = directory / rel
        if not p.is_file():
            raise IncompleteCheckpointError(f"checkpoint {directory} is corrupt: file {rel} is missing")
        actual = p.stat().st_size
        if actual != size:
            raise IncompleteCheckpointError(
                f"checkpoint {directory} is corrupt: file {rel} has {actual} bytes, the manifest says {size} "
                f"(truncated?)")
    expected = manifest.get("checksums")
    if content and expected:
        algorithm = manifest.get("checksum", "xxh3_64")
        for rel, actual in checksums(directory, expected, algorithm).items():
            if actual != expected[rel]:
                raise IncompleteCheckpointError(
                    f"checkpoint {directory} is corrupt: file {rel} does not match its checksum "
                    f"({algorithm} {actual}, the manifest says {expected[rel]})")
    return manifest


def publish(tmp_dir: PathLike, root: PathLike, step: int) -> Path:
    """Rename the completed temp dir to ``step_N`` and then point ``latest`` at it. One process."""
    tmp_dir, root = Path(tmp_dir), Path(root)
    verify(tmp_dir)
    final = root / step_dir_name(step)
    if final.exists():  # re-saving a step (e.g. after a resume): replace the old copy
        old = root / f"{TMP_PREFIX}old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp_dir, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, final.name + "\n")
    _fsync_dir(root)
    return final


def list_published(root: PathLike) -> List[Tuple[int, Path]]:
    """``(step, path)`` of every ``step_N`` directory under ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_latest(root: PathLike) -> Optional[Path]:
    """The directory ``latest`` names, or None if there is no pointer."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _STEP_RE.match(name):
        log.warning("checkpoint root %s: `latest` holds %r, not a step directory; ignoring it", root, name)
        return None
    return Path(root) / name


def resolve(root: PathLike, *, content: bool = True) -> Path:
    """The checkpoint to resume from: the one ``latest`` names if complete, else the newest complete one.

    Every refused directory is logged at WARNING with the reason. ``root`` may also be a checkpoint
    directory itself (it is then verified and returned, or the error raised). ``content`` verifies
    the checksums too (see :func:`verify`).

    Raises:
        NoCheckpointError: no complete checkpoint under ``root`` (the message lists what was refused).
        IncompleteCheckpointError: ``root`` is a single checkpoint directory that is incomplete.
    """
    root = Path(root)
    if (root / MARKER).exists() or _STEP_RE.match(root.name):
        verify(root, content=content)
        return root
    candidates: List[Path] = []
    latest = read_latest(root)
    if latest is not None:
        candidates.append(latest)
    candidates += [p for _, p in reversed(list_published(root)) if p != latest]
    refused = []
    for cand in candidates:
        try:
            verify(cand, content=content)
        except IncompleteCheckpointError as err:
            log.warning("refusing checkpoint: %s; falling back to the previous complete one", err)
            refused.append(str(err))
            continue
        return cand
    detail = ("; refused: " + " | ".join(refused)) if refused else ""
    raise NoCheckpointError(f"no complete checkpoint under {root}{detail}")


def find_resumable(root: PathLike, *, content: bool = True) -> Optional[Path]:
    """Like :func:`resolve` but None when the root has no checkpoint at all (a fresh run)."""
    try:
        return resolve(root, content=content)
    except NoCheckpointError:
        if list_published(root):
            raise  # checkpoints exist but none is complete: resuming from scratch would be a silent reset
        return None


def prune(root: PathLike, keep_last: int) -> List[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale temp dirs. One process.

    The directory ``latest`` names is never deleted; incomplete ``step_N`` directories older than the
    newest complete one are removed too. Returns the deleted paths.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    latest = read_latest(root)
    complete, incomplete = [], []
    for step, p in list_published(root):
        try:
            verify(p)
            complete.append((step, p))
        except IncompleteCheckpointError:
            incomplete.append((step, p))
    keep = {p for _, p in complete[-keep_last:]}
    if latest is not None:
        keep.add(latest)
    newest_complete = complete[-1][0] if complete else -1
    doomed = [p for _, p in complete if p not in keep] + [p for s, p in incomplete if s < newest_complete]
    doomed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith(TMP_PREFIX)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
