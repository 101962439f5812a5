"""Rewards: strict boxed rule (docs/algorithms.md §1.12), math-verify equivalences, registry, failing reward
fns, DAPO shaping."""

from __future__ import annotations

import math

import pytest

from megatron_spo.rollout.reward_registry import REWARD_FNS, RewardManager, get_reward_fn, register_reward
from megatron_spo.rollout.rewards import dapo_overlong_penalty, last_boxed, math_verify_score, spo_strict_boxed
from megatron_spo.rollout.sample import Sample

OK = "<think>2+3 is 5</think>So the answer is \\boxed{5}."


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{5}", "5"),
    ("a \\boxed{1} b \\boxed{2}", "2"),                     # the last one
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),              # nested braces matched
    ("\\boxed{{a}{b}} tail }", "{a}{b}"),
    ("\\boxed{unclosed {x}", None),
    ("no box", None),
    ("\\boxed 5", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("response,gt,expected", [
    (OK, "5", 1.0),
    (OK, " 5", 0.0),                                                   # exact string equality, no normalisation
    ("<think>x</think>\\boxed{0.5}", "\\frac{1}{2}", 0.0),               # equivalent but not equal: 0
    ("<think>x</think>\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("no think tag \\boxed{5}", "5", 0.0),                               # zero </think>
    ("<think>a</think><think>b</think>\\boxed{5}", "5", 0.0),            # two </think>
    ("<think>a</think>\\boxed{5}<code>print(5)</code>", "5", 0.0),       # tool call after </think>
    ("<think>a</think>\\boxed{5}<interpreter>\n5\n</interpreter>", "5", 0.0),
    ("<code>print(5)</code><interpreter>\n5\n</interpreter><think>a</think>\\boxed{5}", "5", 1.0),  # tools before: fine
    ("<think>a</think>\\boxed{4} then \\boxed{5}", "5", 1.0),            # last box wins
    ("<think>a</think>\\boxed{5} then \\boxed{4}", "5", 0.0),
    ("<think>a</think>\\boxed{5}" + "." * 92, "5", 0.0),   # 9 + 92 = 101 chars: the backslash falls outside the last 100
    ("<think>a</think>\\boxed{5}" + "." * 91, "5", 1.0),   # 9 + 91 = 100 chars: just inside
])
def test_strict_boxed_golden(response, gt, expected):
    assert spo_strict_boxed(response, gt) == expected


def test_strict_boxed_window_edge():
    body = "<think>a</think>" + "x" * 400
    exactly = body + "\\boxed{7}" + "." * 91       # 9 + 91 = 100 chars: the box is just inside
    assert len(exactly[-100:]) == 100 and exactly[-100:].startswith("\\boxed{7}")
    assert spo_strict_boxed(exactly, "7") == 1.0
    assert spo_strict_boxed(exactly + ".", "7") == 0.0


@pytest.mark.parametrize("response,gt,expected", [
    ("The answer is \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("The answer is \\boxed{\\dfrac{1}{2}}", "0.5", 1.0),
    ("so \\boxed{1+x^2}", "x^2+1", 1.0),
    ("so \\boxed{3.0}", "3", 1.0),
    ("so \\boxed{4}", "3", 0.0),
    ("no answer here", "3", 0.0),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
])
def test_math_verify_equivalences(response, gt, expected):
    assert math_verify_score(response, gt) == expected


def _sample(text, gt="5", n_tokens=10):
    s = Sample(uid="u/0", request_uid="u", response_text=text, ground_truth=gt)
    s.append_model_tokens(list(range(n_tokens)), [0.0] * n_tokens)
    return s


def test_registry_by_name_and_import_path(tmp_path, monkeypatch):
    assert get_reward_fn("spo_strict_boxed") is spo_strict_boxed
    assert get_reward_fn("math_verify") is math_verify_score
    assert get_reward_fn("megatron_spo.rollout.rewards:last_boxed") is last_boxed
    (tmp_path / "my_rewards.py").write_text(
        "def length_reward(response, ground_truth, **info):\n"
        "    return {'score': len(response) / 10, 'turns': info['sample'].num_turns}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mgr = RewardManager("my_rewards:length_reward")
    assert mgr(_sample("x" * 25)) == 2.5
    with pytest.raises(KeyError, match="unknown reward function 'nope'"):
        get_reward_fn("nope")
    with pytest.raises(AttributeError, match="has no callable 'missing'"):
        get_reward_fn("megatron_spo.rollout.rewards:missing")
    with pytest.raises(ImportError, match="cannot import module"):
        get_reward_fn("no_such_module_xyz:f")

    @register_reward("test_const_reward")
    def const(response, ground_truth):
        return True

    try:
        assert RewardManager("test_const_reward")(_sample("")) == 1.0
        with pytest.raises(ValueError, match="registered twice"):
            register_reward("test_const_reward")(lambda r, g: 0)
    finally:
        REWARD_FNS.pop("test_const_reward")


def test_raising_reward_gives_zero_and_is_counted():
    calls = []

    def flaky(response, ground_truth):
        calls.append(response)
        if "bad" in response:
            raise ZeroDivisionError("division by zero")
        return 1.0

    mgr = RewardManager(flaky)
    samples = [_sample("good"), _sample("bad"), _sample("good"), _sample("bad")]
    assert [mgr(s) for s in samples] == [1.0, 0.0, 1.0, 0.0]
    assert mgr.metrics["reward/errors"] == 2 and mgr.metrics["reward/calls"] == 4
    assert samples[1].reward == 0.0 and samples[1].metrics["reward_errors"] == 1
    assert "reward flaky: ZeroDivisionError: division by zero" in samples[1].errors
    # non-finite and malformed results are errors too
    assert RewardManager(lambda r, g: math.nan)(_sample("x")) == 0.0
    m2 = RewardManager(lambda r, g: {"acc": True})
    assert m2(_sample("x")) == 0.0 and m2.metrics["reward/errors"] == 1


def test_dapo_overlong_penalty_hand_values():
    # L_max 100, buffer 20: free up to 80 tokens, then -1/20 per token
    assert dapo_overlong_penalty(50, 100, 20) == 0.0
    assert dapo_overlong_penalty(80, 100, 20) == 0.0
    assert dapo_overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert dapo_overlong_penalty(100, 100, 20, factor=2.0) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="buffer_len"):
        dapo_overlong_penalty(1, 10, 0)
    mgr = RewardManager("spo_strict_boxed", overlong=(100, 20, 1.0))
    assert mgr(_sample(OK, n_tokens=90)) == pytest.approx(1.0 - 0.5)
    # a failing reward stays exactly 0, no shaping added
    assert RewardManager(lambda r, g: 1 / 0, overlong=(100, 20, 1.0))(_sample(OK, n_tokens=90)) == 0.0
