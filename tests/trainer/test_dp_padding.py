"""Batches balanced over data-parallel ranks (issue 14, item 9): a batch short of a multiple of the DP
size (prompts skipped with ``data.skip_bad_rows``) is padded with failed placeholders, so every rank
gets an equal share, every real sample trains, and the placeholders train nothing and update nothing.
The 2-process run with a skipped prompt is in tests/trainer/test_collectives.py (DP=2)."""

from __future__ import annotations

import pytest
import torch

from megatron_spo.rollout.sample import Sample
from megatron_spo.trainer.loop import pad_for_data_parallel
from megatron_spo.trainer.train_batch import collate, ok_mask, rewards_of


def _sample(i: int) -> Sample:
    s = Sample(uid=f"s0-{i}/0", request_uid=f"s0-{i}", key=f"prompt {i}", prompt_ids=[5, 6, 7 + i],
               meta={"record": i})
    s.append_model_tokens([20 + i, 21], [-0.5, -0.25])
    s.reward = float(i % 2)
    return s


@pytest.mark.parametrize("n, dp, padded", [(7, 2, 8), (5, 4, 8), (6, 3, 6), (1, 2, 2)])
def test_short_batches_are_padded_to_a_multiple_of_dp(n, dp, padded):
    samples = [_sample(i) for i in range(n)]
    out = pad_for_data_parallel(samples, dp)
    assert len(out) == padded and out[:n] == samples
    per = len(out) // dp
    shards = [list(range(r * per, (r + 1) * per)) for r in range(dp)]  # the loop's contiguous shares
    assert sorted(i for s in shards for i in s) == list(range(padded))  # no row falls off the end
    pads = out[n:]
    assert all(not p.ok and p.reward == 0.0 and p.key == samples[-1].key for p in pads)
    assert all(p.meta["record"] == samples[-1].meta["record"] for p in pads)
    assert len({p.uid for p in out}) == padded
    batch = collate(out, pad_id=0)
    assert batch["loss_mask"][n:].sum() == 0 and torch.equal(batch["loss_mask"][:n], collate(samples, 0)["loss_mask"])
    assert ok_mask(out).tolist() == [True] * n + [False] * (padded - n)  # only real samples update the tracker
    assert rewards_of(out[:n]).tolist() == [float(i % 2) for i in range(n)]


def test_a_batch_that_divides_is_left_alone():
    samples = [_sample(i) for i in range(4)]
    assert pad_for_data_parallel(samples, 2) is samples
    assert pad_for_data_parallel([], 2) == []
