"""PromptStream: each epoch a permutation, draws across epoch boundaries, exact resume."""

from __future__ import annotations

import io

import pytest
import torch

from megatron_spo.trainer.prompt_stream import PromptStream


def test_epochs_are_permutations_and_draws_cross_boundaries():
    s = PromptStream(7, seed=3)
    first = s.take(5) + s.take(2)
    assert sorted(first) == list(range(7)) and s.epoch == 0
    mixed = s.take(10)  # all of epoch 1, then 3 of epoch 2
    assert sorted(mixed[:7]) == list(range(7)) and s.epoch == 2 and s.position == 3
    assert len(set(mixed[7:])) == 3


def test_state_round_trip_reproduces_the_next_draws():
    a = PromptStream(11, seed=5)
    a.take(8)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = PromptStream(11, seed=999)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert [a.take(6) for _ in range(4)] == [b.take(6) for _ in range(4)]


def test_bad_use_is_named():
    with pytest.raises(ValueError, match="dataset is empty"):
        PromptStream(0)
    with pytest.raises(ValueError, match="count must be > 0"):
        PromptStream(3).take(0)
    with pytest.raises(ValueError, match="dataset of 3 prompts, this one has 4"):
        PromptStream(4).load_state_dict(PromptStream(3).state_dict())
