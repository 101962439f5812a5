"""Starting rollout servers and making their clients: what the fleet and the Ray launcher share.

:func:`launch_server` runs the embedded engine's HTTP server as a subprocess and waits for its
``LISTENING`` line (:func:`stop_process` ends one); :class:`LocalServers` supervises ``n`` of them
on this host (the launcher interface a :class:`~megatron_spo.rollout.fleet.Fleet` drives:
``start``, ``alive``, ``restart``, ``stop``); :func:`make_client` is the HTTP client of either
protocol for a URL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Callable, Dict, List, Optional

from megatron_spo.rollout.engine import EngineError

# What `launch_server` runs (a module path, not an import: the server runs in its own process).
SERVER_MODULE = "megatron_spo.rollout.embedded.server"


def make_client(kind: str, url: str, **kwargs):
    """An HTTP engine client of ``kind`` ("sglang" or "vllm") for ``url``."""
    if kind == "sglang":
        from megatron_spo.rollout.sglang_client import SGLangClient

        return SGLangClient(url, **kwargs)
    if kind == "vllm":
        from megatron_spo.rollout.vllm_client import VLLMClient

        return VLLMClient(url, **kwargs)
    raise ValueError(f"engine kind must be 'sglang' or 'vllm', got {kind!r}")


def launch_server(model_dir: str, *, host: str = "127.0.0.1", port: int = 0, seed: int = 0,
                  startup_timeout_s: float = 180.0, extra_env: Optional[Dict[str, str]] = None):
    """Start ``python -m megatron_spo.rollout.embedded.server`` and wait for its LISTENING line.

    Returns ``(Popen, url)``. Raises :class:`EngineError` if it exits or stays silent too long.
    """
    env = dict(os.environ, **(extra_env or {}))
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen([sys.executable, "-m", SERVER_MODULE, "--model", model_dir,
                             "--host", host, "--port", str(port), "--seed", str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    box: Dict[str, str] = {}
    reader = threading.Thread(target=lambda: box.setdefault("line", proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(startup_timeout_s)
    line = box.get("line", "").strip()
    if not line.startswith("LISTENING "):
        proc.kill()
        proc.wait(timeout=30)
        raise EngineError(f"server for {model_dir} did not start within {startup_timeout_s} s "
                          f"(exit code {proc.returncode}, first line {line!r})")
    return proc, line.split()[1]


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0, kill_wait_s: float = 10.0) -> None:
    """SIGTERM a running ``proc``, SIGKILL it if it has not exited within ``grace_s`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=kill_wait_s)


class LocalServers:
    """Supervisor of ``n`` embedded-engine HTTP servers running as subprocesses of this host."""

    def __init__(self, model_dir: str, n: int, *, kind: str = "sglang", client_kwargs: Optional[dict] = None,
                 client_factory: Optional[Callable[[str], object]] = None):
        self.model_dir, self.n, self.kind = str(model_dir), int(n), kind
        self.client_kwargs = client_kwargs or {}
        self.client_factory = client_factory or (lambda url: make_client(self.kind, url, **self.client_kwargs))
        self.procs: List[Optional[subprocess.Popen]] = [None] * self.n

    def start(self) -> List[object]:
        return [self.restart(i) for i in range(self.n)]

    def alive(self, i: int) -> bool:
        p = self.procs[i]
        return p is not None and p.poll() is None

    def restart(self, i: int):
        self._kill(i)
        self.procs[i], url = launch_server(self.model_dir, seed=i)
        return self.client_factory(url)

    def kill(self, i: int) -> None:
        """Hard-kill server ``i`` (SIGKILL), as a crash would (tests)."""
        p = self.procs[i]
        if p is not None:
            p.kill()
            p.wait(timeout=30)

    def _kill(self, i: int) -> None:
        if self.procs[i] is not None:
            stop_process(self.procs[i])

    def stop(self) -> None:
        for i in range(self.n):
            self._kill(i)
