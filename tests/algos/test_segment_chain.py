"""SPO-chain: cut points, segment advantages (with/without base), probability mask, whitening, prefix queries."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from megatron_spo.algos.segment_chain import (
    build_prefix_queries,
    chain_advantages_batch,
    chain_cutpoints,
    chain_segment_advantages,
    probability_mask,
    whiten_segment_advantages,
)

#                  t:  0     1    2     3    4    5     6    7     8    9     10   11
PROBS = torch.tensor([0.95, 0.5, 0.95, 0.3, 0.2, 0.99, 0.1, 0.9, 0.8, 0.95, 0.4, 0.95])
# low-prob tokens (p < 0.9; p = 0.9 at t=7 is *not* low): t = 1, 3, 4, 6, 8, 10 -> cuts c = t-1 = 0, 2, 3, 5, 7, 9


def test_cutpoints_every_kth():
    assert chain_cutpoints(PROBS, interval=1).tolist() == [0, 2, 3, 5, 7, 9]
    assert chain_cutpoints(PROBS, interval=2).tolist() == [0, 3, 7]
    assert chain_cutpoints(PROBS, interval=5).tolist() == [0, 9]
    assert chain_cutpoints(PROBS, interval=100).tolist() == [0]
    assert chain_cutpoints(torch.full((5,), 0.99)).tolist() == []


def test_cutpoints_skip_masked_tokens_and_prompt_cut():
    mask = torch.ones(12, dtype=torch.bool)
    mask[3] = False  # e.g. a tool-output token: never a candidate
    assert chain_cutpoints(PROBS, mask, interval=2).tolist() == [0, 5, 9]
    # first token low-prob -> the cut at -1 (prompt state) appears naturally and is not duplicated by the fix
    p = PROBS.clone()
    p[0] = 0.1
    assert chain_cutpoints(p, interval=2).tolist() == [-1, 2, 5, 9]
    assert chain_cutpoints(p, interval=2, include_prompt_cut=True).tolist() == [-1, 2, 5, 9]
    # the quirk fix adds -1 after subsampling when it is not there
    assert chain_cutpoints(PROBS, interval=2, include_prompt_cut=True).tolist() == [-1, 0, 3, 7]
    # lower threshold
    assert chain_cutpoints(PROBS, threshold=0.35, interval=1).tolist() == [2, 3, 5]


# Three cuts on T = 10: valued positions 1, 4, 7 (values 0.2, 0.5, 0.4) and 9 (reward 1.0).
CUTS, VALUES, R, T = [1, 4, 7], [0.2, 0.5, 0.4], 1.0, 10
NO_BASE = [0.0, 0.0, 0.3, 0.3, 0.3, -0.1, -0.1, -0.1, 0.6, 0.6]
WITH_BASE = [0.1, 0.1, 0.3, 0.3, 0.3, -0.1, -0.1, -0.1, 0.6, 0.6]  # base V(prompt) = 0.1 -> first segment 0.2-0.1


def test_chain_three_cuts_without_base_reproduces_first_segment_quirk():
    adv = chain_segment_advantages(T, CUTS, VALUES, R)
    assert adv.dtype == torch.float32 and adv.shape == (10,)
    np.testing.assert_allclose(adv.numpy(), NO_BASE, atol=1e-7)


def test_chain_three_cuts_with_base_value_or_leading_cut():
    np.testing.assert_allclose(chain_segment_advantages(T, CUTS, VALUES, R, base_value=0.1).numpy(), WITH_BASE, atol=1e-7)
    np.testing.assert_allclose(
        chain_segment_advantages(T, [-1] + CUTS, [0.1] + VALUES, R).numpy(), WITH_BASE, atol=1e-7
    )


def test_chain_edge_cases():
    assert chain_segment_advantages(6, [], [], 1.0).tolist() == [0.0] * 6  # no cuts: all zero
    assert chain_segment_advantages(4, [], [], 1.0, base_value=0.25).tolist() == [0.75] * 4
    # cut right before the last token: the last token alone forms the final segment
    np.testing.assert_allclose(
        chain_segment_advantages(4, [0, 2], [0.5, 0.25], 0.0, base_value=0.5).numpy(), [0.0, -0.25, -0.25, -0.25]
    )
    assert chain_segment_advantages(1, [-1], [0.4], 1.0).tolist() == pytest.approx([0.6])


def test_probability_mask():
    m = probability_mask(PROBS)
    assert m.tolist() == [False, True, False, True, True, False, True, False, True, False, True, False]
    resp = torch.ones(12)
    resp[10:] = 0
    assert probability_mask(PROBS, 0.9, resp).nonzero().flatten().tolist() == [1, 3, 4, 6, 8]


def test_batch_wrapper_with_padding_and_prob_mask():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :] = True
    mask[1, :6] = True
    old_probs = torch.full((2, 10), 0.5)
    old_probs[0, [2, 5, 9]] = 0.95
    adv = chain_advantages_batch(
        mask, [CUTS, [2]], [VALUES, [0.5]], torch.tensor([1.0, 0.0]), base_values=[0.1, None], old_probs=old_probs
    )
    row0 = np.array(WITH_BASE)
    row0[[2, 5, 9]] = 0.0  # high-probability tokens get no advantage
    row1 = [0.0, 0.0, 0.0, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0]  # quirk, then 0 - 0.5, then padding
    np.testing.assert_allclose(adv.numpy(), np.stack([row0, row1]), atol=1e-7)
    # without old_probs only the response mask applies
    adv2 = chain_advantages_batch(mask, [CUTS, [2]], [VALUES, [0.5]], [1.0, 0.0], base_values=[0.1, None])
    np.testing.assert_allclose(adv2[0].numpy(), WITH_BASE, atol=1e-7)


def _np_whiten(a, m):
    x = a[m]
    return np.where(m, (a - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8), 0.0)


def test_whitening_over_low_prob_tokens():
    gen = torch.Generator().manual_seed(3)
    adv = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    resp = torch.ones(3, 8, dtype=torch.bool)
    resp[2, 5:] = False
    probs = torch.rand(3, 8, generator=gen, dtype=torch.float64)
    probs[0, [1, 4]] = 0.97
    probs[1, 6] = 0.9  # exactly the threshold: high-probability
    out = whiten_segment_advantages(adv, resp, probs)
    low = (probs < 0.9).numpy() & resp.numpy()
    assert 0 < low.sum() < resp.sum()  # the test is only meaningful if the prob mask removes something
    np.testing.assert_allclose(out.numpy(), _np_whiten(adv.numpy(), low), rtol=1e-10, atol=1e-12)
    assert out[torch.from_numpy(low)].mean().abs() < 1e-12


def test_whitening_falls_back_to_all_tokens():
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=torch.float64)
    resp = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    probs = torch.full((2, 3), 0.97, dtype=torch.float64)
    out = whiten_segment_advantages(adv, resp, probs)
    # mean 2.5, unbiased var 5/3 over the four response tokens
    s = np.sqrt(5.0 / 3.0 + 1e-8)
    np.testing.assert_allclose(out.numpy(), [[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0, 0]], rtol=1e-12)


class _TwoRankSum:
    """An in-process stand-in for a 2-rank all-reduce (sum), run from two threads."""

    def __init__(self):
        self.slots = [None, None]
        self.barrier = threading.Barrier(2)

    def fn(self, rank):
        def reduce(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()
            return total

        return reduce


def test_whitening_cross_rank_same_branch_and_statistics():
    gen = torch.Generator().manual_seed(5)
    adv = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    resp = torch.ones(4, 6, dtype=torch.bool)
    probs = torch.rand(4, 6, generator=gen, dtype=torch.float64) * 0.8
    probs[:2] = 0.99  # rank 0 has no low-probability token at all; rank 1 has many
    comm, outs = _TwoRankSum(), [None, None]

    def run(rank):
        sl = slice(2 * rank, 2 * rank + 2)
        outs[rank] = whiten_segment_advantages(adv[sl], resp[sl], probs[sl], reduce_fn=comm.fn(rank))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    single = whiten_segment_advantages(adv, resp, probs)
    torch.testing.assert_close(torch.cat(outs), single)
    assert torch.all(outs[0] == 0)  # rank 0 did not fall back on its own: no low tokens -> no gradient tokens


def test_prefix_queries_dedup_and_scatter():
    prompts = [[1, 2], [1, 2], [3]]
    responses = [[5, 6, 7, 8], [5, 6, 9, 9], [4, 4]]
    cuts = [[-1, 1, 2], torch.tensor([1, 2]), []]
    q = build_prefix_queries(prompts, responses, cuts)
    assert q.queries == [[1, 2], [1, 2, 5, 6], [1, 2, 5, 6, 7], [1, 2, 5, 6, 9]]
    assert q.owners == [[0, 1, 2], [1, 3], []]
    vals = q.scatter_values([0.1, 0.2, 0.3, 0.4])
    assert [v.tolist() for v in vals] == [[0.1, 0.2, 0.3], [0.2, 0.4], []]
    with pytest.raises(ValueError, match="query_values has 3 entries but there are 4 queries"):
        q.scatter_values([0.1, 0.2, 0.3])


def test_end_to_end_probs_to_advantages():
    probs = torch.tensor([[0.5, 0.95, 0.3, 0.95, 0.2], [0.99, 0.99, 0.4, 0.99, 0.99]])
    mask = torch.ones(2, 5, dtype=torch.bool)
    cuts = [chain_cutpoints(probs[i], interval=2) for i in range(2)]
    assert [c.tolist() for c in cuts] == [[-1, 3], [1]]
    q = build_prefix_queries([[9], [9]], [[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]], cuts)
    assert q.queries == [[9], [9, 10, 11, 12, 13], [9, 20, 21]]
    values = q.scatter_values([0.5, 0.75, 0.25])  # what K rollouts per prefix would return
    adv = chain_advantages_batch(mask, cuts, values, [1.0, 0.0], old_probs=probs)
    # row 0: base 0.5; segment [0..3] -> 0.75-0.5, tail [4] -> 1-0.75; high-prob tokens 1, 3 zeroed
    # row 1: no base -> first segment 0 (quirk), tail [2..4] -> 0-0.25; only token 2 is low-prob
    np.testing.assert_allclose(adv.numpy(), [[0.25, 0, 0.25, 0, 0.25], [0, 0, -0.25, 0, 0]], atol=1e-7)


# ---- bad input -------------------------------------------------------------------------------

def test_bad_inputs_single_chain():
    with pytest.raises(ValueError, match="cut_values has 2 entries but cut_positions has 3"):
        chain_segment_advantages(10, [1, 4, 7], [0.2, 0.5], 1.0)
    with pytest.raises(ValueError, match=r"strictly increasing; cut_positions\[1\] = 7 >= cut_positions\[2\] = 4"):
        chain_segment_advantages(10, [1, 7, 4], [0.2, 0.5, 0.4], 1.0)
    with pytest.raises(ValueError, match=r"strictly increasing; cut_positions\[0\] = 4"):
        chain_segment_advantages(10, [4, 4], [0.2, 0.5], 1.0)
    with pytest.raises(ValueError, match=r"cut_positions\[1\] = 9 is outside \[-1, T-2\]"):
        chain_segment_advantages(10, [1, 9], [0.2, 0.5], 1.0)
    with pytest.raises(ValueError, match=r"cut_positions\[0\] = -2 is outside"):
        chain_segment_advantages(10, [-2, 1], [0.2, 0.5], 1.0)
    with pytest.raises(ValueError, match=r"cut_values\[1\] = nan is not finite"):
        chain_segment_advantages(10, [1, 4], [0.2, float("nan")], 1.0)
    with pytest.raises(ValueError, match="final_reward = nan"):
        chain_segment_advantages(10, [1], [0.2], float("nan"))
    with pytest.raises(ValueError, match="base given twice"):
        chain_segment_advantages(10, [-1, 1], [0.2, 0.3], 1.0, base_value=0.1)
    with pytest.raises(ValueError, match="T must be an int >= 1"):
        chain_segment_advantages(0, [], [], 1.0)
    with pytest.raises(TypeError, match="cut_positions must hold integers"):
        chain_segment_advantages(10, torch.tensor([1.0, 2.0]), [0.2, 0.3], 1.0)


def test_bad_inputs_cutpoints_mask_batch():
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        chain_cutpoints(PROBS, interval=0)
    with pytest.raises(ValueError, match="token_probs must be 1-D"):
        chain_cutpoints(PROBS[None])
    with pytest.raises(ValueError, match=r"old_probs\[3\] = -0.5 is not a probability"):
        probability_mask(torch.tensor([0.1, 0.2, 0.3, -0.5]))
    with pytest.raises(ValueError, match="response_mask shape"):
        probability_mask(PROBS, 0.9, torch.ones(5))
    with pytest.raises(ValueError, match="threshold must be in"):
        probability_mask(PROBS, 1.5)
    mask = torch.ones(2, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="empty batch"):
        chain_advantages_batch(torch.ones(0, 10), [], [], [])
    with pytest.raises(ValueError, match="cut_values has 1 rows but response_mask has B = 2"):
        chain_advantages_batch(mask, [CUTS, []], [VALUES], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"row 1: .*cut_values has 1 entries but cut_positions has 2"):
        chain_advantages_batch(mask, [CUTS, [1, 2]], [VALUES, [0.5]], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"final_rewards\[1\] = nan"):
        chain_advantages_batch(mask, [CUTS, []], [VALUES, []], [1.0, float("nan")])
    with pytest.raises(ValueError, match="old_probs shape"):
        chain_advantages_batch(mask, [CUTS, []], [VALUES, []], [1.0, 0.0], old_probs=torch.ones(2, 3))
    with pytest.raises(ValueError, match="must have the same shape"):
        whiten_segment_advantages(torch.zeros(2, 3), torch.ones(2, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"cut_positions\[1\]\[0\] = 3 is outside"):
        build_prefix_queries([[1], [2]], [[5, 6], [7, 8]], [[0], [3]])
    with pytest.raises(ValueError, match="must have the same length"):
        build_prefix_queries([[1]], [[5, 6], [7, 8]], [[0], [0]])
