"""Reward-function registry and the safe wrapper the scheduler calls.

A reward function is ``fn(response: str, ground_truth, **info) -> float | bool | {"score": float, ...}``.
``info`` holds ``sample`` (the :class:`~megatron_spo.rollout.sample.Sample`) and is only passed to
functions that accept ``**kwargs``. Functions are found by registered name (``spo_strict_boxed``,
``math_verify``) or by import path ``"package.module:function"``.

:class:`RewardManager` sets ``sample.reward``: an exception, a non-numeric or non-finite result gives
reward 0 for that sample, is recorded in ``sample.errors`` and counted (``reward/errors``), and
never propagates, so one bad reward never kills the run.

Where the function runs: a reward named by a string (the config's ``data.reward``) runs in a
:class:`~megatron_spo.rollout.reward_pool.RewardPool` of worker processes with a hard per-call
timeout (``timeout_s``, default 10 s): a call that never returns gives reward 0, is counted
(``reward/timeouts``), logged with the sample uid, and its worker is killed and replaced. Rewards
registered ``inline=True`` (``spo_strict_boxed``: string operations, linear in the response) and
function objects passed directly run in the calling thread, as a process round trip buys them
nothing; ``isolate=True`` sends a module-level function to the pool too. In a worker the function
sees a pickled copy of the sample: what it changes on it is not brought back.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import threading
from typing import Any, Callable, Dict, Optional

from megatron_spo.rollout import rewards
from megatron_spo.rollout.reward_pool import DEFAULT_TIMEOUT_S, RewardPool, RewardWorkerError
from megatron_spo.rollout.reward_worker import resolve
from megatron_spo.rollout.sample import Sample

log = logging.getLogger(__name__)

RewardFn = Callable[..., Any]
REWARD_FNS: Dict[str, RewardFn] = {}
INLINE_FNS: set = set()  # functions that always return quickly: run in the calling thread


def register_reward(name: str, *, inline: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn`` under ``name`` (the value of the reward setting in the config).

    ``inline=True`` declares that ``fn`` always returns quickly (bounded work, no parsing of the
    answer as math): it then runs in the calling thread instead of a worker process.
    """

    def decorator(fn: RewardFn) -> RewardFn:
        if name in REWARD_FNS and REWARD_FNS[name] is not fn:
            raise ValueError(f"reward function {name!r} is registered twice "
                             f"({REWARD_FNS[name].__module__} and {fn.__module__})")
        REWARD_FNS[name] = fn
        if inline:
            INLINE_FNS.add(fn)
        return fn

    return decorator


register_reward("spo_strict_boxed", inline=True)(rewards.spo_strict_boxed)
register_reward("math_verify")(rewards.math_verify_score)


def get_reward_fn(spec: str) -> RewardFn:
    """The reward function named ``spec``: a registered name or ``"module.path:function"``."""
    if spec in REWARD_FNS:
        return REWARD_FNS[spec]
    if ":" not in spec:
        raise KeyError(f"unknown reward function {spec!r}; registered: {sorted(REWARD_FNS)}; "
                       f"or give an import path 'package.module:function'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"reward function {spec!r}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise AttributeError(f"reward function {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def import_path(fn: RewardFn) -> Optional[str]:
    """``"module:qualname"`` that imports back to ``fn`` in a fresh process, or None (a lambda, a local
    function, a function of ``__main__``)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return None
    spec = f"{module}:{qualname}"
    try:
        return spec if resolve(spec) is fn else None
    except Exception:  # noqa: BLE001 (not importable by that name)
        return None


def _takes_kwargs(fn: RewardFn) -> bool:
    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False


def _as_score(value: Any) -> float:
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"reward dict has no 'score' key (keys: {sorted(value)})")
        value = value["score"]
    if isinstance(value, bool):
        return float(value)
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"reward is not finite: {score}")
    return score


class RewardManager:
    """Computes ``sample.reward`` with a reward function, optional DAPO overlong shaping, and error counting.

    A failing or timed-out reward function gives exactly 0 (no shaping added).

    Args:
        fn: a reward function or its name / import path.
        overlong: ``(max_len, buffer_len, factor)`` to add :func:`~megatron_spo.rollout.rewards.dapo_overlong_penalty`
            of the response length (model + tool tokens); ``None`` = off.
        isolate: run ``fn`` in worker processes with a hard timeout; default: yes for a name or import
            path not registered ``inline``, no for a function object.
        timeout_s: hard limit of one call in a worker (seconds).
        workers: most worker processes at once.
    """

    def __init__(self, fn: Any = "spo_strict_boxed", overlong: Optional[tuple] = None, *,
                 isolate: Optional[bool] = None, timeout_s: float = DEFAULT_TIMEOUT_S, workers: int = 4):
        self.name = fn if isinstance(fn, str) else getattr(fn, "__name__", repr(fn))
        self.fn = get_reward_fn(fn) if isinstance(fn, str) else fn
        self._kwargs = _takes_kwargs(self.fn)
        self.overlong = overlong
        self.metrics: Dict[str, float] = {"reward/calls": 0, "reward/errors": 0, "reward/sum": 0.0,
                                          "reward/timeouts": 0}
        self._lock = threading.Lock()  # the scheduler computes rewards in a thread pool
        self.pool: Optional[RewardPool] = None
        if isolate is None:
            isolate = isinstance(fn, str) and self.fn not in INLINE_FNS
        if isolate:
            spec = import_path(self.fn)
            if spec is None:
                message = (f"reward {self.name}: cannot run in a worker process (define it at module level "
                           f"in an importable module)")
                if isinstance(fn, str):  # asked for by the config: run it, but say it cannot be stopped
                    log.warning("%s; it runs in the trainer's threads, without a hard timeout", message)
                else:
                    raise ValueError(message)
            else:
                self.pool = RewardPool(spec, workers=workers, timeout_s=timeout_s, name=self.name)

    def _add(self, key: str, value: float) -> None:
        with self._lock:
            self.metrics[key] += value

    def _failed(self, sample: Sample, kind: str, message: str) -> float:
        """Count a failed call (``reward/<kind>`` here, ``reward_<kind>`` on the sample); its reward is 0."""
        self._add(f"reward/{kind}", 1)
        sample.count(f"reward_{kind}")
        sample.errors.append(message)
        return 0.0

    def _raw(self, sample: Sample) -> Any:
        """The function's result for ``sample``; raises what it raised (or a worker's error / timeout)."""
        if self.pool is None:
            if self._kwargs:
                return self.fn(sample.response_text, sample.ground_truth, sample=sample)
            return self.fn(sample.response_text, sample.ground_truth)
        out = self.pool.call(sample.response_text, sample.ground_truth, sample if self._kwargs else None)
        if out.kind == "timeout":
            raise _RewardTimeout(f"timed out after {self.pool.timeout_s:g}s (worker killed)")
        if out.kind == "error":
            raise _WorkerRaised(out.value)
        return out.value

    def __call__(self, sample: Sample) -> float:
        self._add("reward/calls", 1)
        try:
            score = _as_score(self._raw(sample))
            if self.overlong is not None:
                max_len, buffer_len, factor = self.overlong
                score += rewards.dapo_overlong_penalty(len(sample.response_ids), max_len, buffer_len, factor)
        except _RewardTimeout as e:  # a grader that never returns: 0, counted apart from errors
            log.warning("reward %s: sample %s %s; reward 0", self.name, sample.uid, e)
            score = self._failed(sample, "timeouts", f"reward {self.name}: {e}")
        except RewardWorkerError as e:  # no worker could start; the message names the reward
            score = self._failed(sample, "errors", str(e))
        except Exception as e:  # a broken reward is this sample's problem, not the run's
            detail = str(e) if isinstance(e, _WorkerRaised) else f"{type(e).__name__}: {e}"
            score = self._failed(sample, "errors", f"reward {self.name}: {detail}")
        sample.reward = score
        self._add("reward/sum", score)
        return score

    def prestart(self) -> None:
        """Start a worker process now (in the background), so the first reward does not wait for its import."""
        if self.pool is not None:
            self.pool.prestart()

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        if self.pool is not None:
            self.pool.close()


class _WorkerRaised(Exception):
    """The function raised in a worker; the message is already ``"TypeName: message"``."""


class _RewardTimeout(Exception):
    """A worker call passed its hard timeout (the worker was killed)."""
