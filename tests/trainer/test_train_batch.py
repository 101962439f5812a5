"""Samples -> actor batch: token alignment, failed samples, advantages, mini-batches, mismatch."""

from __future__ import annotations

import pytest
import torch

from megatron_spo.rollout.sample import Sample
from megatron_spo.run import train_batch as tb


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


def test_failed_samples_train_nothing_and_get_zero_advantage():
    good = [_sample(f"g{i}", [1], [2, 3], [1, 1], [-1.0, -1.0], r) for i, r in enumerate([1.0, 0.0, 1.0])]
    bad = _sample("x", [1], [2], [1], [-1.0], None, ok=False)
    samples = good + [bad]
    batch = tb.collate(samples, pad_id=0)
    assert batch["loss_mask"][3].sum() == 0
    ok = tb.ok_mask(samples)
    rewards = tb.rewards_of(samples)
    baseline = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    adv = tb.sequence_advantages("spo", rewards, ok, baseline=baseline)
    # independent: a = r - 0.5 over the 3 good ones = [.5, -.5, .5]; mean 1/6; unbiased std sqrt(1/3)
    a = torch.tensor([0.5, -0.5, 0.5], dtype=torch.float64)
    expected = (a - a.mean()) / (a.std() + 1e-8)
    assert torch.allclose(adv[:3], expected) and adv[3] == 0
    full = tb.with_advantages(batch, adv)
    assert torch.allclose(full["advantages"][0], torch.tensor([0, expected[0], expected[0]], dtype=torch.float32))


def test_group_advantages_use_record_ids():
    samples = [_sample(f"s{i}", [1], [2], [1], [-1.0], r, record=i // 2) for i, r in enumerate([1.0, 0.0, 1.0, 1.0])]
    rewards, ok = tb.rewards_of(samples), tb.ok_mask(samples)
    gid = torch.tensor([s.meta["record"] for s in samples])
    adv = tb.sequence_advantages("grpo", rewards, ok, group_ids=gid)
    s = torch.tensor([1.0, 0.0]).std()
    assert torch.allclose(adv, torch.tensor([0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(tb.sequence_advantages("dr_grpo", rewards, ok, group_ids=gid),
                          torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="need group ids"):
        tb.sequence_advantages("rloo", rewards, ok)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        tb.sequence_advantages("ppo", rewards, ok)


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
