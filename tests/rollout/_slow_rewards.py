"""Reward functions for tests/rollout/test_reward_pool.py, in a module a worker process imports quickly."""

from __future__ import annotations

import os
import time


def loops_forever(response, ground_truth):
    """Pure-python busy loop on 'hang' (it holds the interpreter lock between switches)."""
    while "hang" in response:
        pass
    return 1.0


def sleeps_forever(response, ground_truth):
    if "hang" in response:
        time.sleep(3600)
    return 1.0


def exits_hard(response, ground_truth):
    if "die" in response:
        os._exit(3)
    return 0.5


def with_sample(response, ground_truth, **info):
    return {"score": len(info["sample"].response_ids) / 10}
