"""avg@k, maj@k and the unbiased pass@k estimator against independent computations."""

from __future__ import annotations

import itertools

import pytest

from megatron_spo.trainer.eval_metrics import format_table, majority_correct, pass_at_k, summarize


@pytest.mark.parametrize("n, c, k", [(5, 2, 1), (5, 2, 2), (5, 2, 3), (5, 2, 4), (8, 0, 3), (8, 8, 8), (6, 3, 6)])
def test_pass_at_k_equals_enumeration_over_subsets(n, c, k):
    # Independent definition: the fraction of k-subsets of the n samples that hold a correct one.
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_the_success_rate():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


@pytest.mark.parametrize("n, c, k, msg", [(3, 1, 4, "k=4 is larger"), (3, 4, 1, "c=4 correct out of n=3"),
                                          (3, 1, 0, "k >= 1")])
def test_pass_at_k_rejects_bad_counts(n, c, k, msg):
    with pytest.raises(ValueError, match=msg):
        pass_at_k(n, c, k)


def test_majority_vote():
    assert majority_correct(["4", "5", "4", None], [1, 0, 1, 0]) == 1.0
    assert majority_correct(["5", "5", "4", "4"], [0, 0, 1, 1]) == 0.0  # tie: first seen ("5") wins
    assert majority_correct([None, ""], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="2 answers but 3"):
        majority_correct(["1", "2"], [1, 0, 0])


def test_summarize_and_table():
    correct = [[1, 0, 0, 1], [0, 0, 0, 0]]
    answers = [["7", "8", "8", "7"], ["1", "2", "3", "3"]]
    out = summarize(correct, answers, ks=(1, 2))
    assert out["avg@4"] == pytest.approx(0.25)
    assert out["maj@4"] == pytest.approx(0.5)  # tie 7/8 in problem 0 -> "7" first -> correct
    assert out["pass@1"] == pytest.approx(0.25)
    assert out["pass@2"] == pytest.approx((1 - 1 / 6) / 2)  # C(2,2)/C(4,2) = 1/6 misses in problem 0
    table = format_table({"toy": out})
    assert table.splitlines()[0].split()[:3] == ["benchmark", "problems", "avg@4"]
    with pytest.raises(ValueError, match="problem 1 has 3 samples"):
        summarize([[1, 0], [1, 0, 1]])
