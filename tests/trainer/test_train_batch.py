"""Samples -> actor batch: token alignment, failed samples, mini-batches, mismatch (advantages: test_algorithm_steps.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_spo.rollout.sample import Sample
from megatron_spo.trainer import train_batch as tb


def _sample(uid, prompt, resp, mask, lps, reward, ok=True, record=0):
    s = Sample(uid=uid, request_uid=uid, prompt_ids=prompt, response_ids=resp, loss_mask=mask,
               rollout_logprobs=lps, reward=reward, meta={"record": record})
    if not ok:
        s.fail("engine down")
    return s


def test_collate_aligns_response_tokens_after_the_prompt():
    a = _sample("a", [5, 6, 7], [8, 9], [1, 1], [-0.5, -0.25], 1.0)
    b = _sample("b", [5], [3, 4, 2], [1, 0, 1], [-1.0, 0.0, -2.0], 0.0)
    batch = tb.collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 3, 4, 2, 0]]
    assert batch["lengths"].tolist() == [5, 4]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 1, 0]]
    assert batch["rollout_logp"].tolist() == [[0, 0, 0, -0.5, -0.25], [0, -1.0, 0, -2.0, 0]]


def test_failed_samples_train_nothing():
    good = _sample("g", [1], [2, 3], [1, 1], [-1.0, -1.0], 1.0)
    bad = _sample("x", [1], [2], [1], [-1.0], None, ok=False)
    batch = tb.collate([good, bad], pad_id=0)
    assert batch["loss_mask"][1].sum() == 0 and batch["rollout_logp"][1].abs().sum() == 0
    assert tb.ok_mask([good, bad]).tolist() == [True, False]
    assert tb.rewards_of([good, bad]).tolist() == [1.0, 0.0]


def test_missing_reward_and_empty_batch_are_named():
    with pytest.raises(ValueError, match="sample q has no reward"):
        tb.rewards_of([_sample("q", [1], [2], [1], [-1.0], None)])
    with pytest.raises(ValueError, match="no samples"):
        tb.collate([], pad_id=0)


def test_mini_batches_split_rows_evenly():
    batch = {"input_ids": torch.arange(10).view(5, 2), "lengths": torch.full((5,), 2)}
    parts = tb.mini_batches(batch, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 3]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    with pytest.raises(ValueError, match="cannot split 5 sequences into 6 mini-batches"):
        tb.mini_batches(batch, 6)


def test_mismatch_sums_and_finish():
    old = torch.tensor([[0.0, -1.0, -2.0], [0.0, -1.0, 0.0]])
    roll = torch.tensor([[0.0, -1.5, -2.0], [0.0, -0.5, 7.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    sums = tb.mismatch_sums(old, roll, mask)
    assert sums == {"kl_sum": -0.5 + 0.0 + 0.5, "tokens": 3.0, "abs_diff_max": 0.5}
    assert tb.finish_mismatch(sums) == {"mismatch/token_kl": 0.0, "mismatch/max_abs_logp_diff": 0.5}
    assert tb.finish_mismatch({"kl_sum": 0.0, "tokens": 0.0, "abs_diff_max": 0.0})["mismatch/token_kl"] == 0.0
