"""The fleet: what the trainer sees — one :class:`Engine` over a set of endpoints.

Endpoints are the embedded engine, HTTP clients for URLs a user passes, or servers a launcher
starts and supervises (``launchers.LocalServers``: subprocesses on this host; ``ray_fleet.RayServers``:
a Ray actor per server). The fleet

* routes each request to the healthy, up-to-date endpoint with the fewest requests in flight;
* retries a request that failed with :class:`EngineError` (dead server, 5xx, garbage, timeout) on
  another endpoint, up to ``max_attempts``; a :class:`RequestError` is the request's own fault and
  goes straight back to the caller;
* delivers every request id exactly once: a request id already delivered is refused, every attempt
  carries ``<id>#<attempt>`` so an abandoned attempt can never be mistaken for the delivered one,
  and :attr:`Fleet.delivered` counts deliveries per id;
* health-checks endpoints in a background thread; a supervised server found dead is restarted,
  brought to the fleet's weight version (from the last checkpoint path; after bucket-only updates
  it waits for the next update) and then routed to again. Endpoints never serve stale weights.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megatron_spo.rollout.engine import EngineError, GenerateResult, RequestError, SamplingParams, WeightSource
from megatron_spo.rollout.launchers import LocalServers, make_client


@dataclass
class Endpoint:
    """One engine in the fleet and the fleet's bookkeeping about it."""

    engine: object
    name: str
    inflight: int = 0
    healthy: bool = True
    version: int = 0
    incarnation: int = 0  # bumped on every restart
    served: int = 0
    failures: List[str] = field(default_factory=list)


class Fleet:
    """Engine protocol over several endpoints (see the module doc).

    Args:
        engines: the endpoints' engines (EmbeddedEngine, SGLangClient, VLLMClient, ...).
        launcher: optional supervisor of the servers behind ``engines`` (same order), with
            ``alive(i) -> bool``, ``restart(i) -> engine`` and ``stop()``.
        max_attempts: tries per request across endpoints.
        wait_for_endpoint_s: how long a request waits for some endpoint to be usable before failing.
        health_interval_s: period of the background health check (0 disables the thread).
    """

    name = "fleet"

    def __init__(self, engines: Sequence[object], *, launcher=None, max_attempts: int = 3,
                 wait_for_endpoint_s: float = 120.0, health_interval_s: float = 1.0):
        if not engines:
            raise ValueError("Fleet needs at least one engine")
        self.endpoints = [Endpoint(e, getattr(e, "url", None) or f"{getattr(e, 'name', 'engine')}[{i}]")
                          for i, e in enumerate(engines)]
        self.launcher = launcher
        self.max_attempts = int(max_attempts)
        self.wait_for_endpoint_s = float(wait_for_endpoint_s)
        self._version = 0
        self._last_path: Optional[str] = None  # last checkpoint directory, to resync restarted servers
        self._lock = threading.Lock()
        self._update_lock = threading.Lock()
        self.delivered: "collections.Counter[str]" = collections.Counter()
        self.retries = 0
        self.restarts = 0
        self._stop = threading.Event()
        self._health_thread: Optional[threading.Thread] = None
        if health_interval_s > 0:
            self._health_thread = threading.Thread(target=self._health_loop, args=(health_interval_s,),
                                                   name="fleet-health", daemon=True)
            self._health_thread.start()

    # ------------------------------------------------------------------------------ factories

    @classmethod
    def from_urls(cls, urls: Sequence[str], kind: str = "sglang", **kwargs) -> "Fleet":
        """Endpoints a user passes (servers started elsewhere, e.g. by slurm)."""
        client_kwargs = kwargs.pop("client_kwargs", {})
        return cls([make_client(kind, u, **client_kwargs) for u in urls], **kwargs)

    @classmethod
    def local(cls, model_dir: str, n: int, kind: str = "sglang", client_kwargs: Optional[dict] = None,
              **kwargs) -> "Fleet":
        """``n`` embedded-engine HTTP servers as supervised subprocesses of this host."""
        launcher = LocalServers(model_dir, n, kind=kind, client_kwargs=client_kwargs)
        return cls(launcher.start(), launcher=launcher, **kwargs)

    @classmethod
    def ray(cls, model_dir: str, n: int, kind: str = "sglang", client_kwargs: Optional[dict] = None,
            ray_kwargs: Optional[dict] = None, **kwargs) -> "Fleet":
        """``n`` servers placed and supervised by Ray, one actor each (``ray`` extra)."""
        from megatron_spo.rollout.ray_fleet import RayServers

        launcher = RayServers(model_dir, n, kind=kind, client_kwargs=client_kwargs, **(ray_kwargs or {}))
        return cls(launcher.start(), launcher=launcher, **kwargs)

    # ------------------------------------------------------------------------------- protocol

    @property
    def weight_version(self) -> int:
        return self._version

    def health(self) -> bool:
        return any(self._usable(ep) for ep in self.endpoints)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> List[GenerateResult]:
        """Blocking batch call: each prompt is one fleet request (spread over the endpoints)."""
        async def run():
            return await asyncio.gather(*[self.agenerate(p, sampling) for p in prompts])

        return list(asyncio.run(run()))

    async def agenerate(self, prompt: Sequence[int], sampling: SamplingParams,
                        request_id: Optional[str] = None) -> GenerateResult:
        rid = request_id or uuid.uuid4().hex
        with self._lock:
            if self.delivered[rid]:
                raise RequestError(f"request id {rid!r} was already delivered (ids must be unique)")
        tried = set()
        errors: List[str] = []
        for attempt in range(self.max_attempts):
            idx = await self._acquire(tried)
            if idx is None:
                errors.append(f"no usable endpoint within {self.wait_for_endpoint_s} s")
                break
            ep = self.endpoints[idx]
            tried.add((idx, ep.incarnation))
            try:
                res = await ep.engine.agenerate(prompt, sampling, request_id=f"{rid}#{attempt}")
            except EngineError as err:
                errors.append(f"{ep.name}: {err}")
                self._mark_failed(idx, str(err))
                with self._lock:
                    self.retries += 1
                continue
            finally:
                with self._lock:
                    ep.inflight -= 1
            with self._lock:
                if self.delivered[rid]:  # cannot happen with sequential attempts; guard the invariant
                    raise RuntimeError(f"request id {rid!r} delivered twice")
                self.delivered[rid] += 1
                ep.served += 1
            res.meta.update(request_id=rid, endpoint=ep.name, attempts=attempt + 1)
            return res
        raise EngineError(f"request {rid}: failed after {len(errors)} attempt(s): " + " | ".join(errors))

    def update_weights(self, source: WeightSource, version: int) -> None:
        """Send the update to every live endpoint; an endpoint that fails it leaves the rotation
        until it is restarted and resynced (or the next update reaches it)."""
        if not isinstance(source, (str, os.PathLike)):
            source = [list(b) for b in source]  # every endpoint consumes the buckets
        with self._update_lock:
            self._last_path = str(source) if isinstance(source, (str, os.PathLike)) else None
            self._version = int(version)
            for i, ep in enumerate(self.endpoints):
                try:
                    ep.engine.update_weights(source, version)
                    ep.version = int(version)
                except EngineError as err:
                    self._mark_failed(i, f"update_weights: {err}")

    def pause(self) -> None:
        self._broadcast("pause")

    def resume(self) -> None:
        self._broadcast("resume")

    def close(self) -> None:
        self._stop.set()
        if self._health_thread is not None:
            self._health_thread.join(timeout=30)
        if self.launcher is not None:
            self.launcher.stop()
        for ep in self.endpoints:
            close = getattr(ep.engine, "close", None)
            if close is not None and self.launcher is not None:
                close()

    def stats(self) -> Dict[str, object]:
        return {"version": self._version, "retries": self.retries, "restarts": self.restarts,
                "endpoints": [{"name": ep.name, "healthy": ep.healthy, "inflight": ep.inflight, "served": ep.served,
                               "version": ep.version, "incarnation": ep.incarnation} for ep in self.endpoints]}

    # ------------------------------------------------------------------------------ internals

    def _usable(self, ep: Endpoint) -> bool:
        return ep.healthy and ep.version == self._version

    async def _acquire(self, tried) -> Optional[int]:
        """Index of the least-loaded usable endpoint not yet tried (in this incarnation); its
        in-flight count is already incremented. Waits for one to become usable, up to a deadline."""
        deadline = time.monotonic() + self.wait_for_endpoint_s
        while True:
            with self._lock:
                cands = [i for i, ep in enumerate(self.endpoints)
                         if self._usable(ep) and (i, ep.incarnation) not in tried]
                if cands:
                    best = min(cands, key=lambda i: (self.endpoints[i].inflight, self.endpoints[i].served))
                    self.endpoints[best].inflight += 1
                    return best
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    def _mark_failed(self, idx: int, why: str) -> None:
        with self._lock:
            ep = self.endpoints[idx]
            ep.healthy = False
            ep.failures.append(why[:300])

    def _broadcast(self, method: str) -> None:
        for i, ep in enumerate(self.endpoints):
            try:
                getattr(ep.engine, method)()
            except EngineError as err:
                self._mark_failed(i, f"{method}: {err}")

    def _health_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for i in range(len(self.endpoints)):
                if self._stop.is_set():
                    return
                try:
                    self._check(i)
                except Exception as err:  # noqa: BLE001 - the supervisor must survive any one failure
                    self._mark_failed(i, f"health check: {type(err).__name__}: {err}")

    def _check(self, idx: int) -> None:
        ep = self.endpoints[idx]
        if self.launcher is not None and not self.launcher.alive(idx):
            self._mark_failed(idx, "server process is dead")
            engine = self.launcher.restart(idx)
            with self._lock:
                ep.engine, ep.name = engine, getattr(engine, "url", ep.name)
                ep.incarnation += 1
                ep.version = 0
                self.restarts += 1
        if ep.version != self._version:
            self._resync(ep)
        ok = bool(ep.engine.health())
        with self._lock:
            ep.healthy = ok

    def _resync(self, ep: Endpoint) -> None:
        with self._update_lock:
            if self._last_path is not None:
                ep.engine.update_weights(self._last_path, self._version)
                ep.version = self._version
