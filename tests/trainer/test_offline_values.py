"""Offline value files: merging subsets with at most n scores per prompt, atomic save, key checks."""

from __future__ import annotations

import json

import pytest

from megatron_spo.trainer.offline_values import load_scores, merge_scores, save_scores


def test_merge_keeps_at_most_n_scores_drawn_from_the_union():
    a = {"p1": [1, 0, 1], "p2": [0]}
    b = {"p1": [1, 1, 0, 0, 1, 1, 0], "p3": [1, 1]}
    merged = merge_scores([a, b], n=8, seed=3)
    assert sorted(merged) == ["p1", "p2", "p3"]
    assert len(merged["p1"]) == 8 and merged["p2"] == [0.0] and merged["p3"] == [1.0, 1.0]
    # the 8 kept are a sub-multiset of the 10 given
    pool = a["p1"] + b["p1"]
    for v in set(merged["p1"]):
        assert merged["p1"].count(v) <= pool.count(v)
    assert merge_scores([a, b], n=8, seed=3) == merged  # seeded
    assert merge_scores([b, a], n=8, seed=3)["p2"] == [0.0]


def test_merge_rejects_bad_scores():
    with pytest.raises(ValueError, match="prompt 'q' has a non-finite"):
        merge_scores([{"q": [float("nan")]}], n=8)
    with pytest.raises(ValueError, match="n must be >= 1"):
        merge_scores([], n=0)


def test_save_is_atomic_and_load_checks_keys(tmp_path):
    path = save_scores({"What is 1+1?": [1.0, 0.0]}, tmp_path / "vals" / "values.json")
    assert json.loads(path.read_text()) == {"What is 1+1?": [1.0, 0.0]}
    assert not list(path.parent.glob("*.tmp"))
    assert load_scores(path, expected_keys=["What is 1+1?", "other"]) == {"What is 1+1?": [1.0, 0.0]}
    with pytest.raises(ValueError, match="none of its 1 prompt keys matches a dataset prompt"):
        load_scores(path, expected_keys=["user\nWhat is 1+1?"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        load_scores(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_scores(tmp_path / "broken.json")
