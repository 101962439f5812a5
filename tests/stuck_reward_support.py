"""A reward for tests/test_train_preempt.py that gets stuck on one chosen sample the way math-verify does
on ``9^{9^{9^{9^{9}}}}``: in C code (a huge integer power) that holds the interpreter lock for minutes.

``$STUCK_UID`` names the sample; on it the reward first writes ``$STUCK_MARKER`` (so the test knows
the reward is stuck), then computes ``9 ** 9 ** 9``. Every other sample gets the last-``\\boxed{}`` match.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_spo.rollout.rewards import last_boxed

REWARD = "stuck_reward_support:stuck_on_one_sample"


def stuck_on_one_sample(response: str, ground_truth, **info) -> float:
    sample = info["sample"]
    if sample.uid == os.environ.get("STUCK_UID"):
        Path(os.environ["STUCK_MARKER"]).write_text(f"stuck on {sample.uid} in pid {os.getpid()}\n")
        _ = 9 ** 9 ** 9  # minutes in C with the interpreter lock held; only a kill ends it
    box = last_boxed(response)
    return 1.0 if box is not None and box.strip() == str(ground_truth).strip() else 0.0
