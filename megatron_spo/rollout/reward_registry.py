"""Reward-function registry and the safe wrapper the scheduler calls.

A reward function is ``fn(response: str, ground_truth, **info) -> float | bool | {"score": float, ...}``.
``info`` holds ``sample`` (the :class:`~megatron_spo.rollout.sample.Sample`) and is only passed to
functions that accept ``**kwargs``. Functions are found by registered name (``spo_strict_boxed``,
``math_verify``) or by import path ``"package.module:function"``.

:class:`RewardManager` sets ``sample.reward``: an exception, a non-numeric or non-finite result gives
reward 0 for that sample, is recorded in ``sample.errors`` and counted (``reward/errors``), and
never propagates, so one bad reward never kills the run.
"""

from __future__ import annotations

import importlib
import inspect
import math
import threading
from typing import Any, Callable, Dict, Optional

from megatron_spo.rollout import rewards
from megatron_spo.rollout.sample import Sample

RewardFn = Callable[..., Any]
REWARD_FNS: Dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn`` under ``name`` (the value of the reward setting in the config)."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in REWARD_FNS and REWARD_FNS[name] is not fn:
            raise ValueError(f"reward function {name!r} is registered twice "
                             f"({REWARD_FNS[name].__module__} and {fn.__module__})")
        REWARD_FNS[name] = fn
        return fn

    return decorator


register_reward("spo_strict_boxed")(rewards.spo_strict_boxed)
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

    A failing reward function gives exactly 0 (no shaping added).

    Args:
        fn: a reward function or its name / import path.
        overlong: ``(max_len, buffer_len, factor)`` to add :func:`~megatron_spo.rollout.rewards.dapo_overlong_penalty`
            of the response length (model + tool tokens); ``None`` = off.
    """

    def __init__(self, fn: Any = "spo_strict_boxed", overlong: Optional[tuple] = None):
        self.name = fn if isinstance(fn, str) else getattr(fn, "__name__", repr(fn))
        self.fn = get_reward_fn(fn) if isinstance(fn, str) else fn
        self._kwargs = _takes_kwargs(self.fn)
        self.overlong = overlong
        self.metrics: Dict[str, float] = {"reward/calls": 0, "reward/errors": 0, "reward/sum": 0.0}
        self._lock = threading.Lock()  # the scheduler computes rewards in a thread pool

    def _add(self, key: str, value: float) -> None:
        with self._lock:
            self.metrics[key] += value

    def __call__(self, sample: Sample) -> float:
        self._add("reward/calls", 1)
        try:
            if self._kwargs:
                raw = self.fn(sample.response_text, sample.ground_truth, sample=sample)
            else:
                raw = self.fn(sample.response_text, sample.ground_truth)
            score = _as_score(raw)
            if self.overlong is not None:
                max_len, buffer_len, factor = self.overlong
                score += rewards.dapo_overlong_penalty(len(sample.response_ids), max_len, buffer_len, factor)
        except Exception as e:  # a broken reward is this sample's problem, not the run's
            self._add("reward/errors", 1)
            sample.count("reward_errors")
            sample.errors.append(f"reward {self.name}: {type(e).__name__}: {e}")
            score = 0.0
        sample.reward = score
        self._add("reward/sum", score)
        return score
