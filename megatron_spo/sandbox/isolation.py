"""Isolation for one sandboxed run: bubblewrap argv, per-slot uid, rlimits, cgroup v1 limits, tree kill.

Layers (the measurements behind the choice are in docs/engine_contracts.md §4):

* **bubblewrap** ``--unshare-all`` (user, pid, net, ipc, uts, cgroup namespaces): no network at all (the
  sandbox has only its own loopback), its own pid 1 so every process of the run dies with it, a mount
  namespace that shows only ``/usr`` (and its ``/bin``, ``/lib`` symlinks), ``/etc`` read-only, a fresh
  ``/dev`` (read-only but for a size-capped ``/dev/shm``) and ``/proc``, and a size-capped private tmpfs on
  ``/tmp`` holding the work dir ``/tmp/w``. The new root itself is remounted read-only.
  ``/root``, ``/home``, ``/work`` and the host ``/tmp`` are simply not there. The environment is cleared.
* **a dedicated non-root uid per worker slot** (``uid_base + slot``), set in the child before ``exec``.
  ``RLIMIT_NPROC`` counts every process of a uid (and is ignored for root), so with one uid per slot a fork
  bomb in one request exhausts only its own slot's budget and cannot starve the other slots or the host.
  The same uid is the handle for the final sweep: after a run no process of that uid may survive.
* **rlimits**: address space (the request's memory limit), CPU seconds, processes, file size, open files,
  core dumps off.
* **cgroup v1** ``pids`` and ``memory`` (one child cgroup per slot) when the host has them mounted and
  writable; otherwise the server logs a note and relies on the layers above.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import resource
import shutil
import signal
import termios
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

BWRAP_INSTALL_HINT = "apt-get install bubblewrap"
SANDBOX_WORKDIR = "/tmp/w"
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"


def find_bwrap() -> Optional[str]:
    return shutil.which("bwrap")


def bwrap_missing_message() -> str:
    return (
        "bubblewrap (bwrap) was not found on PATH; the sandbox refuses to run model-written code without it.\n"
        f"Install it with:  {BWRAP_INSTALL_HINT}\n"
        "(or pass --unsafe-no-isolation to run WITHOUT namespaces: only for trusted code on a throwaway machine)"
    )


@dataclass(frozen=True)
class RunLimits:
    """Per-run resource limits. Units: MiB, seconds, bytes, counts."""

    memory_mb: int
    cpu_seconds: int
    max_procs: int
    max_file_bytes: int
    max_open_files: int

    @staticmethod
    def for_timeout(run_timeout: float, **kw) -> "RunLimits":
        # One spare CPU second: a single-threaded loop is stopped by the wall clock first, so the
        # CPU limit only fires for multi-threaded burners that use CPU faster than wall time.
        return RunLimits(cpu_seconds=int(math.ceil(run_timeout)) + 1, **kw)

    def rlimits(self) -> List[Tuple[int, int]]:
        return [
            (resource.RLIMIT_AS, self.memory_mb << 20),
            (resource.RLIMIT_CPU, self.cpu_seconds),
            (resource.RLIMIT_NPROC, self.max_procs),
            (resource.RLIMIT_FSIZE, self.max_file_bytes),
            (resource.RLIMIT_NOFILE, self.max_open_files),
            (resource.RLIMIT_CORE, 0),
        ]


def _drop_controlling_tty() -> None:
    """Detach the child from the server's controlling terminal, if any (TIOCNOTTY).

    Without a controlling tty, ``/dev/tty`` cannot be opened and TIOCSTI keystroke injection into the
    operator's shell (CVE-2017-5226) is impossible. This replaces bwrap's ``--new-session``/``setsid``:
    a new session also creates a new scheduler autogroup per run, which costs spawn latency on loaded
    machines. The child stays a plain process-group leader (not a session leader), so TIOCNOTTY only
    detaches it and sends no SIGHUP to anyone.
    """
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return  # no controlling terminal: nothing to drop
    try:
        fcntl.ioctl(fd, termios.TIOCNOTTY)
    finally:
        os.close(fd)


def make_preexec(
    uid: Optional[int], gid: Optional[int], limits: RunLimits, cgroup_procs_fds: Sequence[int]
) -> Callable[[], None]:
    """The function run in the forked child before ``exec``: join cgroups, set rlimits, drop to the slot uid.

    It runs in the child of a multi-threaded server, so it only makes system calls: no imports, no logging,
    nothing that could wait on a lock another thread held at fork time.

    The controlling tty is dropped first (see :func:`_drop_controlling_tty`). Order matters: cgroup membership is written first (the fds were opened by root in the parent), rlimits
    are set while still root (lowering a hard limit is always allowed), and the uid drop comes last so the
    exec'd program can never raise them again. ``uid=None`` keeps the current uid (non-root server).
    """
    rlims = limits.rlimits()
    fds = list(cgroup_procs_fds)

    def preexec() -> None:
        _drop_controlling_tty()
        for fd in fds:
            os.write(fd, b"0")  # "0" = the writing process itself
        for res, value in rlims:
            resource.setrlimit(res, (value, value))
        if uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

    return preexec


@dataclass(frozen=True)
class BwrapSpec:
    """What the sandbox sees besides its own work dir: extra read-only host paths (e.g. a venv for numpy)."""

    bwrap: str
    ro_binds: Tuple[str, ...] = ()
    workdir_bytes: int = 64 << 20


def _root_entries() -> List[str]:
    """Host top-level paths needed to run the interpreter: /usr plus its merged-/usr symlinks, and /etc."""
    args: List[str] = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = "/" + name
        if os.path.islink(host):
            args += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            args += ["--ro-bind", host, host]
    args += ["--ro-bind", "/etc", "/etc"]
    return args


def bwrap_argv(spec: BwrapSpec, command: Sequence[str]) -> List[str]:
    """Full argv: bwrap options, then ``command`` (the interpreter and its arguments) run in ``/tmp/w``.

    The work dir starts empty: the request's files arrive later, written by the sandbox's own bootstrap
    (:mod:`megatron_spo.sandbox.bootstrap`), so nothing of the request ever touches the host disk.
    """
    argv = [
        spec.bwrap,
        "--unshare-all",
        "--unshare-user",  # explicit, so that --disable-userns is accepted
        "--disable-userns",  # no nested user namespaces (a common kernel attack surface)
        "--die-with-parent",
        "--hostname",
        "sandbox",
        *_root_entries(),
    ]
    for path in spec.ro_binds:
        argv += ["--ro-bind", path, path]
    argv += [
        "--dev",
        "/dev",
        # /dev is a tmpfs too: keep /dev/shm (multiprocessing needs it) but size-capped, the rest read-only.
        "--size",
        str(spec.workdir_bytes),
        "--tmpfs",
        "/dev/shm",
        "--remount-ro",
        "/dev",
        "--proc",
        "/proc",
        "--size",
        str(spec.workdir_bytes),
        "--tmpfs",
        "/tmp",
        "--dir",
        SANDBOX_WORKDIR,
        # bwrap's new root is a tmpfs owned by the sandbox user; make it read-only so "/" cannot be used
        # as unbounded scratch space (only the size-capped /tmp is writable).
        "--remount-ro",
        "/",
        "--chdir",
        SANDBOX_WORKDIR,
        "--clearenv",
        "--setenv",
        "PATH",
        SANDBOX_PATH,
        "--setenv",
        "HOME",
        SANDBOX_WORKDIR,
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "PYTHONDONTWRITEBYTECODE",
        "1",
        "--",
        *command,
    ]
    return argv


def sandbox_env() -> Dict[str, str]:
    """Environment of the spawned process when bwrap is not used (``--clearenv`` handles the bwrap case)."""
    return {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


# ----------------------------------------------------------------------------- process-tree kill


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (``PR_SET_CHILD_SUBREAPER``).

    bwrap's outer process can exit before its in-namespace pid 1 is reaped; that pid 1 (and, in the unsafe
    mode, any daemonised child) is then re-parented. Many container inits never reap, and unreaped zombies
    of a slot uid keep counting against its RLIMIT_NPROC. As subreaper the server reaps them itself
    (see :func:`kill_uid`). Returns False where prctl is unavailable.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER = 36
    except (OSError, AttributeError):
        return False


def _uid_procs(uid: int) -> Tuple[List[int], List[int]]:
    """Processes whose effective uid is ``uid`` (owner of ``/proc/<pid>``): (live pids, zombie pids whose
    parent is this process)."""
    live, our_zombies = [], []
    me = os.getpid()
    with os.scandir("/proc") as it:
        for entry in it:
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != uid:
                    continue
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                state, ppid = fields[0], int(fields[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            if state not in (b"Z", b"X"):
                live.append(int(entry.name))
            elif ppid == me:
                our_zombies.append(int(entry.name))
    return live, our_zombies


def _sigkill(pids: Sequence[int]) -> int:
    """SIGKILL each pid (already gone is fine), then yield briefly so the kernel can tear them down;
    returns how many signals were delivered."""
    killed = 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    time.sleep(0.002)
    return killed


def kill_uid(uid: int, exclude: Sequence[int] = (), rounds: int = 50) -> int:
    """SIGKILL every process of ``uid`` until none is left, then reap its zombies that were re-parented to
    us (never the pids in ``exclude``: those belong to asyncio's child watcher). Returns how many were killed.

    Only valid because the slot uid is dedicated to one run at a time. A process can fork between the scan
    and the kill, so repeat; RLIMIT_NPROC bounds how many there can be.
    """
    if uid == 0 or uid == os.getuid():
        raise ValueError(f"refusing to sweep uid {uid}: it is the server's own uid or root")
    killed = 0
    for _ in range(rounds):
        live, zombies = _uid_procs(uid)
        for pid in zombies:
            if pid not in exclude:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        if not live:
            return killed
        killed += _sigkill(live)
    log.error("uid %d still has processes after %d kill rounds: %s", uid, rounds, _uid_procs(uid)[0])
    return killed


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- cgroup v1


@dataclass
class CgroupV1:
    """One ``pids`` and/or ``memory`` cgroup per worker slot, under a directory owned by this server.

    Detected at start: a controller is used only if ``/sys/fs/cgroup/<controller>`` is a v1 hierarchy
    and we can create a child there. Whatever is not available is listed in ``notes``.
    """

    name: str
    root: str = "/sys/fs/cgroup"
    controllers: Dict[str, str] = field(default_factory=dict)  # controller -> our parent dir
    notes: List[str] = field(default_factory=list)

    def setup(self, slots: int, max_procs: int) -> None:
        for ctrl in ("pids", "memory"):
            base = os.path.join(self.root, ctrl)
            probe = "tasks"  # every v1 hierarchy root has it; cgroup2 does not
            if not os.path.exists(os.path.join(base, probe)):
                self.notes.append(f"cgroup v1 {ctrl} controller not mounted at {base}")
                continue
            parent = os.path.join(base, self.name)
            try:
                os.makedirs(parent, exist_ok=True)
                for s in range(slots):
                    os.makedirs(os.path.join(parent, f"slot{s}"), exist_ok=True)
                    if ctrl == "pids":
                        self._write(os.path.join(parent, f"slot{s}", "pids.max"), str(max_procs))
            except OSError as exc:
                self.notes.append(f"cgroup v1 {ctrl} not usable ({exc}); relying on rlimits")
                continue
            self.controllers[ctrl] = parent

    @staticmethod
    def _write(path: str, value: str) -> None:
        with open(path, "w") as f:
            f.write(value)

    def slot_dirs(self, slot: int) -> List[str]:
        return [os.path.join(parent, f"slot{slot}") for parent in self.controllers.values()]

    def set_memory_limit(self, slot: int, memory_bytes: int) -> None:
        """The slot's memory limit for the next run (its sandbox may already be inside the cgroup)."""
        if "memory" in self.controllers:
            d = os.path.join(self.controllers["memory"], f"slot{slot}")
            try:
                self._write(os.path.join(d, "memory.limit_in_bytes"), str(memory_bytes))
            except OSError as exc:
                log.warning("could not set memory limit of %s: %s", d, exc)

    def procs_fds(self, slot: int) -> List[int]:
        """Open the slot's ``cgroup.procs`` files (the child joins by writing to them); close them after spawn."""
        return [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC) for d in self.slot_dirs(slot)]

    def kill_all(self, slot: int, rounds: int = 50) -> int:
        """SIGKILL every process still in the slot's cgroups (catches anything that changed uid, which cannot
        happen without privileges, but costs one small read)."""
        killed = 0
        for d in self.slot_dirs(slot):
            for _ in range(rounds):
                try:
                    with open(os.path.join(d, "cgroup.procs")) as f:
                        pids = [int(x) for x in f.read().split()]
                except OSError:
                    break
                if not pids:
                    break
                killed += _sigkill(pids)
        return killed

    def teardown(self) -> None:
        for parent in list(self.controllers.values()):
            for entry in sorted(os.listdir(parent)):
                path = os.path.join(parent, entry)
                if os.path.isdir(path):
                    try:
                        os.rmdir(path)
                    except OSError as exc:
                        log.warning("could not remove cgroup %s: %s", path, exc)
            try:
                os.rmdir(parent)
            except OSError as exc:
                log.warning("could not remove cgroup %s: %s", parent, exc)
        self.controllers.clear()
