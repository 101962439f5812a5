"""SPO-tree: node values, edge advantages (rloo / grpo), zero-advantage filter, on-policy replay buffer."""

from __future__ import annotations

import io
import math

import pytest
import torch

from megatron_spo.algos.segment_tree import (
    Edge,
    OnPolicyReplayBuffer,
    SegmentTree,
    bok,
    edge_advantages,
    filter_zero_advantage_edges,
    node_values,
)


def two_level_tree() -> SegmentTree:
    """root(prompt [100, 101]) -> a (finished, r=1), b -> {b1: 1, b2: 0, b3: 0}, c -> {c1: 1, c2: 1}."""
    t = SegmentTree([100, 101], question_id="q0")
    a = t.add_child(0, [1, 2], finished=True, reward=1.0)
    b = t.add_child(0, [3], finished=False)
    c = t.add_child(0, [4, 5], finished=False)
    t.add_child(b, [6], finished=True, reward=1.0)
    t.add_child(b, [7, 7], finished=True, reward=0.0)
    t.add_child(b, [8], finished=False, reward=0.0)  # hit the depth limit unfinished: graded 0 by the caller
    t.add_child(c, [9], finished=True, reward=1.0)
    t.add_child(c, [10], finished=True, reward=1.0)
    assert (a, b, c) == (1, 2, 3)
    return t


# By hand: V(a)=1, V(b)=1/3, V(c)=1, V(root)=mean(1, 1/3, 1)=7/9.
# Population std of root's children: deviations 2/9, -4/9, 2/9 -> var 24/81/3 = 8/81 -> std sqrt(8)/9.
# std(b) = std([1,0,0]) = sqrt(2/9); std(c) = 0.
V = [7 / 9, 1.0, 1 / 3, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
STD = [math.sqrt(8) / 9, 0.0, math.sqrt(2 / 9), 0.0, 0, 0, 0, 0, 0]
RLOO = {1: 2 / 9, 2: -4 / 9, 3: 2 / 9, 4: 2 / 3, 5: -1 / 3, 6: -1 / 3, 7: 0.0, 8: 0.0}
PARENT_STD = {1: STD[0], 2: STD[0], 3: STD[0], 4: STD[2], 5: STD[2], 6: STD[2], 7: 0.0, 8: 0.0}


def test_node_values_by_hand():
    nv = node_values(two_level_tree())
    assert nv.value.tolist() == pytest.approx(V, abs=1e-12)
    assert nv.std.tolist() == pytest.approx(STD, abs=1e-12)


def test_structure_and_full_ids():
    t = two_level_tree()
    assert t.full_ids(5) == [100, 101, 3, 7, 7]
    assert t.nodes[5].depth == 2 and t.nodes[5].parent == 2
    assert [i for i in range(len(t)) if t.is_leaf(i)] == [1, 4, 5, 6, 7, 8]


def test_edge_advantages_rloo_by_hand():
    edges = edge_advantages(two_level_tree(), "rloo")
    assert [e.child for e in edges] == list(range(1, 9))
    for e in edges:
        assert e.advantage == pytest.approx(RLOO[e.child], abs=1e-12)
        assert e.value == pytest.approx(V[e.child]) and e.parent_value == pytest.approx(V[e.parent])
        assert e.question_id == "q0"
    e4 = edges[3]
    assert (e4.parent, e4.child, e4.query_ids, e4.response_ids) == (2, 4, [100, 101, 3], [6])
    assert edges[0].query_ids == [100, 101] and edges[0].response_ids == [1, 2]


def test_edge_advantages_grpo_by_hand():
    edges = edge_advantages(two_level_tree(), "grpo")
    for e in edges:
        assert e.advantage == pytest.approx(RLOO[e.child] / (PARENT_STD[e.child] + 1e-8), rel=1e-9, abs=1e-12)
    # e.g. root -> a: (2/9) / (sqrt(8)/9) = 2/sqrt(8) = 0.7071; b -> b1: (2/3)/sqrt(2/9) = sqrt(2)
    assert edges[0].advantage == pytest.approx(0.70710678, rel=1e-7)
    assert edges[3].advantage == pytest.approx(math.sqrt(2), rel=1e-7)
    assert edges[6].advantage == 0.0 and edges[7].advantage == 0.0  # std 0 siblings: 0, not NaN


def test_bok_and_filter_drops_exactly_zero_advantage_edges():
    assert bok(0.5) == pytest.approx(1 - 0.5**4)
    assert bok(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]
    for method in ("rloo", "grpo"):
        edges = edge_advantages(two_level_tree(), method)
        kept = filter_zero_advantage_edges(edges)
        assert [e.child for e in kept] == [1, 2, 3, 4, 5, 6]  # c -> c1, c -> c2 have A = 0 and equal values
        dropped = [e for e in edges if e not in kept]
        assert all(e.advantage == 0.0 for e in dropped)


def test_bad_tree_inputs():
    t = SegmentTree([1])
    t.add_child(0, [2], finished=False)
    with pytest.raises(ValueError, match=r"leaf node 1 \(depth 1\) of question 0 needs a finite reward"):
        node_values(t)
    t.nodes[1].reward = float("nan")
    with pytest.raises(ValueError, match="leaf node 1"):
        node_values(t)
    with pytest.raises(IndexError, match="parent 7 is not a node index"):
        t.add_child(7, [3], finished=True, reward=1.0)
    t.nodes[1].reward = 1.0
    with pytest.raises(ValueError, match="method must be 'rloo' or 'grpo'"):
        edge_advantages(t, "ppo")


def _edges(question, n, start=0):
    return [Edge(question, 0, start + j, [1], [start + j], 0.1, 0.5, 0.4) for j in range(n)]


def test_replay_buffer_per_question_cap_and_removal():
    buf = OnPolicyReplayBuffer(max_age=8, per_question=32, seed=0)
    buf.add(_edges("A", 40) + _edges("B", 10), iteration=0)
    first = buf.sample(0)
    by_q = {q: [e.child for e in first if e.question_id == q] for q in ("A", "B")}
    assert len(by_q["A"]) == 32 and len(set(by_q["A"])) == 32
    assert sorted(by_q["B"]) == list(range(10))
    assert sorted(by_q["A"]) != list(range(32))  # random, not the first 32 (chance 1/C(40,32))
    assert all(e.iteration == 0 for e in first)
    assert len(buf) == 8
    second = buf.sample(1)
    assert sorted(e.child for e in second) == sorted(set(range(40)) - set(by_q["A"]))  # the rest, no repeats
    assert len(buf) == 0 and buf.sample(2) == []


def test_replay_buffer_age_drop():
    buf = OnPolicyReplayBuffer(max_age=8, per_question=2, seed=1)
    buf.add(_edges("A", 5), iteration=0)
    buf.add(_edges("A", 1, start=100), iteration=3)
    assert buf.evict(7) == 0  # age 7: still usable (up to 7 iterations stale)
    assert buf.evict(8) == 5  # age 8: the iteration-0 edges go; the iteration-3 edge stays
    assert [(e.child, e.iteration) for e in buf.sample(8)] == [(100, 3)]
    buf.add(_edges("B", 3), iteration=9)
    assert len(buf.sample(17)) == 0  # 17 - 9 = 8: dropped before sampling
    with pytest.raises(ValueError, match="iteration 5 is earlier than the last one seen"):
        buf.add(_edges("C", 1), iteration=5)


def test_replay_buffer_state_dict_round_trip():
    a = OnPolicyReplayBuffer(max_age=8, per_question=3, seed=42)
    a.add(_edges("A", 10) + _edges(7, 6), iteration=2)
    a.sample(2)  # advance the generator
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = OnPolicyReplayBuffer(max_age=1, per_question=1, seed=0)
    b.load_state_dict(torch.load(blob, weights_only=True))
    assert (b.max_age, b.per_question, len(b)) == (8, 3, len(a))
    na, nb = a.sample(3), b.sample(3)
    assert [(e.question_id, e.child, e.iteration) for e in na] == [(e.question_id, e.child, e.iteration) for e in nb]
    assert len(na) == 6
    # same seed, same draws; a different seed gives a different draw of the 10 "A" edges
    c, d = OnPolicyReplayBuffer(seed=9, per_question=3), OnPolicyReplayBuffer(seed=10, per_question=3)
    c.add(_edges("A", 10), 0)
    d.add(_edges("A", 10), 0)
    draws = [[e.child for e in buf.sample(0)] for buf in (c, d)]
    assert draws[0] != draws[1]
    with pytest.raises(KeyError, match="missing key 'edges'"):
        b.load_state_dict({"max_age": 8, "per_question": 3, "last_iteration": 0, "rng_state": a.state_dict()["rng_state"]})


def test_replay_buffer_bad_config():
    with pytest.raises(ValueError, match="max_age must be >= 1"):
        OnPolicyReplayBuffer(max_age=0)
    with pytest.raises(ValueError, match="per_question must be >= 1"):
        OnPolicyReplayBuffer(per_question=0)
