"""Asynchronous per-sample rollout scheduler: single-stream (SPO) and group (GRPO) delivery.

Every sample is its own asyncio task: ``rollout_fn(engine, request, index)`` (an agent loop's
``run``), limited to ``max_concurrency`` at once. What differs between the modes is only delivery:

- ``single_stream``: a finished sample is ready at once, in completion order; no barrier.
- ``group``: the ``n`` samples of a request are held until all ``n`` are done, then released
  together as one list (ordered by replica index).

Per sample, in this order:

1. **Retries.** ``EngineError`` (and a rollout that exceeds ``sample_timeout_s``) restarts the
   rollout, up to ``max_retries`` times; then the sample is delivered with ``finish_reason
   "error"`` and the last error. Any other exception fails the sample at once (bad input is not
   retried). A failed sample has reward 0 and must not be trained on (``Sample.ok`` is False).
2. **Staleness.** With ``max_staleness = b``, a sample whose oldest weight version is below
   ``current - b`` is dropped and regenerated (counted in ``stale_dropped``), after at most
   ``max_regenerations`` times it is delivered as an error. The check runs when a sample finishes
   and again when it is handed out (weights may have moved while it waited). The current version
   comes from ``version_fn`` (default: ``engine.weight_version``).
3. **Reward.** ``reward_fn(sample)`` (a :class:`~megatron_spo.rollout.reward_registry.RewardManager`
   or any function setting ``sample.reward``) runs when the sample finishes, in a small thread pool
   with a timeout (``reward_timeout_s``): a grader that raises or outlives it gives reward 0, is
   counted, and never stalls the event loop. ``reward_timeout_s=None`` runs it inline instead. A
   thread cannot be stopped, and one stuck in C code holding the interpreter lock stalls the whole
   process: the RewardManager therefore runs graders that could hang (math-verify, user functions)
   in worker processes it kills at its own, shorter, hard timeout.

Partial rollouts on a weight update are the agent loop's job: an engine that aborts in-flight
generations (finish_reason "abort") has them resumed from the partial tokens or restarted
(``AgentLoopConfig.on_abort``); the resumed sample carries both weight versions, and the staleness
bound then sees the older one.

Never a hung step: ``get_batch`` takes a timeout and raises :class:`SchedulerTimeout` naming what is
in flight, and raises at once when fewer items than asked can ever arrive.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Union

from megatron_spo.rollout.engine import Engine, EngineError
from megatron_spo.rollout.sample import RolloutRequest, Sample

RolloutFn = Callable[[Engine, RolloutRequest, int], Awaitable[Sample]]
Item = Union[Sample, List[Sample]]

MODES = ("single_stream", "group")


class SchedulerTimeout(TimeoutError):
    """``get_batch`` waited longer than its timeout."""


@dataclasses.dataclass
class SchedulerConfig:
    """Scheduling policy.

    Attributes:
        mode: "single_stream" (deliver each sample when done) or "group" (deliver the n samples of a
            request together).
        max_concurrency: rollouts in flight at once.
        max_staleness: ``None`` = no bound; ``b`` = drop samples whose oldest weight version is
            older than ``current - b`` (0 = only samples from the current weights).
        max_retries: restarts of a rollout after ``EngineError`` / timeout before it is reported failed.
        sample_timeout_s: seconds one rollout attempt may take (``None``: no limit).
        max_regenerations: stale regenerations of one sample before it is reported failed.
        retry_backoff_s: sleep before a retry (the concurrency slot is released meanwhile).
        reward_timeout_s: seconds one reward computation may take (``None``: inline, no limit).
        reward_workers: threads computing rewards.
    """

    mode: str = "single_stream"
    max_concurrency: int = 64
    max_staleness: Optional[int] = None
    max_retries: int = 2
    sample_timeout_s: Optional[float] = None
    max_regenerations: int = 3
    retry_backoff_s: float = 0.0
    reward_timeout_s: Optional[float] = 60.0
    reward_workers: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SchedulerConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.max_concurrency < 1:
            raise ValueError(f"SchedulerConfig.max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"SchedulerConfig.max_staleness must be >= 0 or None, got {self.max_staleness}")
        if self.max_retries < 0 or self.max_regenerations < 0:
            raise ValueError("SchedulerConfig.max_retries and max_regenerations must be >= 0")


class RolloutScheduler:
    """Runs rollouts per sample and hands finished samples (or groups) to the trainer.

    Must be used from inside a running event loop (``submit`` creates tasks). For a synchronous
    trainer use :class:`ThreadedScheduler`.

    Args:
        engine: anything implementing the ``Engine`` protocol (one engine or a fleet).
        rollout_fn: ``async (engine, request, index) -> Sample``, e.g. ``SPOCodeAgentLoop(...).run``.
        config: scheduling policy.
        reward_fn: ``reward_fn(sample) -> None`` that sets ``sample.reward`` (never raises).
        version_fn: the current weight version (default ``engine.weight_version``).
    """

    def __init__(self, engine: Engine, rollout_fn: RolloutFn, config: Optional[SchedulerConfig] = None, *,
                 reward_fn: Optional[Callable[[Sample], Any]] = None,
                 version_fn: Optional[Callable[[], int]] = None):
        self.engine = engine
        self.rollout_fn = rollout_fn
        self.cfg = config or SchedulerConfig()
        self.reward_fn = reward_fn
        self.version_fn = version_fn or (lambda: int(engine.weight_version))
        self.metrics: Dict[str, float] = collections.defaultdict(float)
        self._sem: Optional[asyncio.Semaphore] = None
        self._changed: Optional[asyncio.Event] = None
        self._ready: Deque[Item] = collections.deque()
        self._groups: Dict[str, List[Optional[Sample]]] = {}
        self._requests: Dict[str, RolloutRequest] = {}
        self._tasks: set = set()
        self._undelivered: Dict[str, int] = {}
        self._regens: Dict[str, int] = collections.defaultdict(int)
        self.completion_order: List[str] = []
        self._reward_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

    # -- submitting -------------------------------------------------------------------------

    def _ensure_loop_state(self) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.cfg.max_concurrency)
            self._changed = asyncio.Event()

    def submit(self, request: RolloutRequest) -> None:
        """Start the ``request.n`` rollouts of ``request`` (call from inside the event loop)."""
        self._ensure_loop_state()
        if request.uid in self._requests:
            raise ValueError(f"request uid {request.uid!r} is already in flight; uids must be unique")
        self._requests[request.uid] = request
        self._undelivered[request.uid] = request.n
        if self.cfg.mode == "group":
            self._groups[request.uid] = [None] * request.n
        self.metrics["requests_submitted"] += 1
        for i in range(request.n):
            self._spawn(request, i)

    def _spawn(self, request: RolloutRequest, index: int) -> None:
        task = asyncio.get_running_loop().create_task(self._run_one(request, index))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def in_flight(self) -> int:
        """Rollouts started and not yet finished (running or waiting for a concurrency slot)."""
        return len(self._tasks)

    @property
    def ready(self) -> int:
        return len(self._ready)

    # -- one sample ---------------------------------------------------------------------------

    def _stale(self, sample: Sample) -> bool:
        b = self.cfg.max_staleness
        if b is None or not sample.ok or sample.min_weight_version is None:
            return False
        return sample.min_weight_version < self.version_fn() - b

    def _failed(self, request: RolloutRequest, index: int, message: str) -> Sample:
        s = Sample(uid=f"{request.uid}/{index}", request_uid=request.uid, group_index=index, key=request.key,
                   ground_truth=request.ground_truth, meta=dict(request.meta))
        return s.fail(message)

    async def _attempt(self, request: RolloutRequest, index: int) -> Sample:
        """One rollout with retries; never raises (failures become error samples)."""
        uid = f"{request.uid}/{index}"
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.metrics["retries"] += 1
                if self.cfg.retry_backoff_s:
                    await asyncio.sleep(self.cfg.retry_backoff_s * attempt)
            async with self._sem:
                try:
                    sample = await asyncio.wait_for(self.rollout_fn(self.engine, request, index),
                                                    self.cfg.sample_timeout_s)
                    sample.count("retries", attempt)
                    return sample
                except asyncio.TimeoutError:
                    self.metrics["timeouts"] += 1
                    last = f"rollout timed out after {self.cfg.sample_timeout_s}s"
                except EngineError as e:
                    self.metrics["engine_errors"] += 1
                    last = f"EngineError: {e}"
                except Exception as e:  # bad input or a bug in the rollout: no retry, never kills the run
                    self.metrics["rollout_exceptions"] += 1
                    return self._failed(request, index, f"sample {uid}: {type(e).__name__}: {e}")
        return self._failed(request, index, f"sample {uid}: failed after {self.cfg.max_retries} retries; last: {last}")

    async def _run_one(self, request: RolloutRequest, index: int) -> None:
        uid = f"{request.uid}/{index}"
        while True:
            sample = await self._attempt(request, index)
            if not self._stale(sample):
                break
            self.metrics["stale_dropped"] += 1
            self._regens[uid] += 1
            if self._regens[uid] > self.cfg.max_regenerations:
                sample = self._failed(request, index, f"sample {uid}: still stale after "
                                      f"{self.cfg.max_regenerations} regenerations (bound {self.cfg.max_staleness})")
                break
            self.metrics["regenerations"] += 1
        sample.count("regenerations", self._regens.pop(uid, 0))
        if sample.ok and self.reward_fn is not None:
            await self._reward(sample)
        self._deliver(sample)

    async def _reward(self, sample: Sample) -> None:
        try:
            if self.cfg.reward_timeout_s is None:
                self.reward_fn(sample)
                return
            if self._reward_pool is None:
                self._reward_pool = concurrent.futures.ThreadPoolExecutor(self.cfg.reward_workers,
                                                                          thread_name_prefix="reward")
            # the thread works on a copy: a grader that outlives its timeout must not change a
            # sample already handed to the trainer
            work = dataclasses.replace(sample, errors=list(sample.errors), metrics=dict(sample.metrics))
            fut = asyncio.get_running_loop().run_in_executor(self._reward_pool, self.reward_fn, work)
            await asyncio.wait_for(fut, self.cfg.reward_timeout_s)
            sample.reward, sample.errors, sample.metrics = work.reward, work.errors, work.metrics
        except asyncio.TimeoutError:
            self.metrics["reward_timeouts"] += 1
            self._reward_failed(sample, f"reward: timed out after {self.cfg.reward_timeout_s}s")
        except Exception as e:  # a bare reward function (not a RewardManager) raised: 0, counted, run goes on
            self._reward_failed(sample, f"reward: {type(e).__name__}: {e}")

    @staticmethod
    def _reward_failed(sample: Sample, message: str) -> None:
        sample.reward = 0.0
        sample.count("reward_errors")
        sample.errors.append(message)

    def _deliver(self, sample: Sample) -> None:
        self.metrics["samples_finished"] += 1
        if not sample.ok:
            self.metrics["sample_errors"] += 1
        for k, v in sample.metrics.items():
            self.metrics[f"sample/{k}"] += v
        self.completion_order.append(sample.uid)
        if self.cfg.mode == "single_stream":
            self._ready.append(sample)
        else:
            group = self._groups[sample.request_uid]
            group[sample.group_index] = sample
            if all(s is not None for s in group):
                del self._groups[sample.request_uid]
                self._ready.append(list(group))
        self._changed.set()

    # -- handing out ----------------------------------------------------------------------------

    def _handed_out(self, item: Item) -> None:
        """Forget a request once every one of its samples has been handed out."""
        members = item if isinstance(item, list) else [item]
        uid = members[0].request_uid
        self._undelivered[uid] -= len(members)
        if self._undelivered[uid] <= 0:
            del self._undelivered[uid]
            del self._requests[uid]

    def _recheck(self, item: Item) -> Optional[Item]:
        """Staleness at hand-out time: stale members are regenerated; returns the item if still fresh."""
        members = item if isinstance(item, list) else [item]
        stale = [s for s in members if self._stale(s)]
        if not stale:
            return item
        req = self._requests[members[0].request_uid]
        if isinstance(item, list):
            group: List[Optional[Sample]] = list(item)
            for s in stale:
                group[s.group_index] = None
            self._groups[req.uid] = group
        for s in stale:
            self.metrics["stale_dropped"] += 1
            self.metrics["regenerations"] += 1
            self._spawn(req, s.group_index)
        return None

    async def get(self, timeout: Optional[float] = None) -> Item:
        """The next finished sample (single_stream) or group (group mode)."""
        return (await self.get_batch(1, timeout))[0]

    async def get_batch(self, k: int, timeout: Optional[float] = None) -> List[Item]:
        """``k`` finished items, in the order they became ready.

        Raises:
            SchedulerTimeout: not ``k`` items within ``timeout`` seconds (the ones collected so far
                stay queued for the next call).
            RuntimeError: fewer than ``k`` items can ever arrive (nothing left in flight).
        """
        self._ensure_loop_state()
        deadline = None if timeout is None else time.monotonic() + timeout
        out: List[Item] = []
        while len(out) < k:
            while self._ready and len(out) < k:
                item = self._recheck(self._ready.popleft())
                if item is not None:
                    out.append(item)
            if len(out) == k:
                break
            if not self._tasks:
                self._ready.extendleft(reversed(out))
                raise RuntimeError(f"asked for {k} items but only {len(out)} are ready and nothing is in flight; "
                                   f"submit more requests")
            self._changed.clear()
            left = None if deadline is None else deadline - time.monotonic()
            try:
                if left is not None and left <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                self._ready.extendleft(reversed(out))
                raise SchedulerTimeout(f"got {len(out)} of {k} items in {timeout}s; {self.in_flight} rollouts in "
                                       f"flight, {len(self._groups)} groups incomplete") from None
        for item in out:
            self._handed_out(item)
        return out

    async def aclose(self) -> None:
        """Cancel everything in flight."""
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._reward_pool is not None:
            self._reward_pool.shutdown(wait=False, cancel_futures=True)
            self._reward_pool = None


class ThreadedScheduler:
    """A :class:`RolloutScheduler` on its own event loop in a daemon thread, for a synchronous trainer.

    Rollouts keep running between ``get_batch`` calls (that is what makes single-stream training
    asynchronous). Same arguments as :class:`RolloutScheduler`.
    """

    def __init__(self, *args, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-scheduler", daemon=True)
        self._thread.start()
        self.scheduler = RolloutScheduler(*args, **kwargs)

    def _call(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def submit(self, requests: List[RolloutRequest]) -> None:
        async def go():
            for r in requests:
                self.scheduler.submit(r)

        self._call(go())

    def get_batch(self, k: int, timeout: Optional[float] = None) -> List[Item]:
        return self._call(self.scheduler.get_batch(k, timeout))

    @property
    def metrics(self) -> Dict[str, float]:
        return dict(self.scheduler.metrics)

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self.scheduler.aclose(), timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop.close()
