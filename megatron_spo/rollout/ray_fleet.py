"""Rollout servers placed and supervised by Ray: one Ray actor per server (``ray`` extra).

Each actor owns one ``python -m megatron_spo.rollout.embedded.server`` process on the node Ray
placed it on and reports whether it is alive. :class:`RayServers` has the launcher interface
:class:`megatron_spo.rollout.fleet.Fleet` supervises (``start``, ``alive``, ``restart``, ``stop``):
a server process that died is restarted inside its actor; an actor that died (node lost) is
replaced by a new one, which Ray may place on another node.

On one machine the servers bind 127.0.0.1. On a cluster pass ``host="node"``: each server binds its
node's IP address (as Ray reports it) so the trainer can reach it.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from megatron_spo.optional import require
from megatron_spo.rollout.launchers import launch_server, make_client


class ServerActor:
    """Body of the Ray actor (wrapped with ``ray.remote`` at run time, so Ray stays optional)."""

    def __init__(self, model_dir: str, seed: int, host: str, env: Optional[Dict[str, str]] = None):
        self.model_dir, self.seed, self.env = model_dir, seed, env or {}
        if host == "node":
            import ray

            host = ray.util.get_node_ip_address()
        self.host = host
        self.proc = None
        self.url: Optional[str] = None

    def start(self) -> str:
        self.stop()
        self.proc, self.url = launch_server(self.model_dir, host=self.host, seed=self.seed, extra_env=self.env)
        return self.url

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pid(self) -> int:
        return -1 if self.proc is None else self.proc.pid

    def kill_server(self) -> None:
        """SIGKILL the server process, as a crash would (tests)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - escalate to SIGKILL whatever went wrong
                self.proc.kill()
                self.proc.wait(timeout=10)


class RayServers:
    """``n`` servers, one Ray actor each; the launcher a :class:`Fleet` supervises.

    Args:
        model_dir: HF model directory every server loads (must be readable on every node).
        n: number of servers.
        kind: client kind for the endpoints ("sglang" or "vllm"; the embedded server speaks both).
        num_cpus: CPUs Ray reserves per server actor (placement).
        host: "127.0.0.1" (one machine) or "node" (bind each node's IP).
        ray_init: keyword arguments for ``ray.init`` if Ray is not initialised yet (e.g. ``address``).
        call_timeout_s: timeout of every actor call (a hung actor counts as dead).
    """

    def __init__(self, model_dir: str, n: int, *, kind: str = "sglang", num_cpus: float = 1.0,
                 host: str = "127.0.0.1", client_kwargs: Optional[dict] = None, ray_init: Optional[dict] = None,
                 call_timeout_s: float = 300.0):
        self.ray = require("ray", "Ray-placed rollout servers")
        if not self.ray.is_initialized():
            self.ray.init(**{"include_dashboard": False, "log_to_driver": False, **(ray_init or {})})
        self.model_dir, self.n, self.kind, self.host = str(model_dir), int(n), kind, host
        self.client_kwargs = client_kwargs or {}
        self.call_timeout_s = float(call_timeout_s)
        self._actor_cls = self.ray.remote(num_cpus=num_cpus, max_restarts=0)(ServerActor)
        self.actors: List[Optional[object]] = [None] * self.n

    def _call(self, i: int, method: str):
        actor = self.actors[i]
        return self.ray.get(getattr(actor, method).remote(), timeout=self.call_timeout_s)

    def start(self) -> List[object]:
        return [self.restart(i) for i in range(self.n)]

    def alive(self, i: int) -> bool:
        if self.actors[i] is None:
            return False
        try:
            return bool(self.ray.get(self.actors[i].alive.remote(), timeout=min(30.0, self.call_timeout_s)))
        except Exception:  # noqa: BLE001 - RayActorError, GetTimeoutError, ...: the actor is gone or hung
            return False

    def restart(self, i: int):
        url = None
        if self.actors[i] is not None:
            try:
                url = self._call(i, "start")  # the actor lives: restart its server process
            except Exception:  # noqa: BLE001 - the actor itself is dead: replace it below
                self.ray.kill(self.actors[i], no_restart=True)
                self.actors[i] = None
        if url is None:
            self.actors[i] = self._actor_cls.remote(self.model_dir, i, self.host)
            url = self._call(i, "start")
        return make_client(self.kind, url, **self.client_kwargs)

    def kill(self, i: int) -> None:
        """SIGKILL server ``i``'s process (tests)."""
        self._call(i, "kill_server")

    def kill_actor(self, i: int) -> None:
        """Kill actor ``i`` and its server, as losing a node would (tests)."""
        try:
            self._call(i, "kill_server")
        finally:
            self.ray.kill(self.actors[i], no_restart=True)

    def stop(self) -> None:
        for i, actor in enumerate(self.actors):
            if actor is None:
                continue
            try:
                self._call(i, "stop")
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
            self.ray.kill(actor, no_restart=True)
            self.actors[i] = None
