"""The SPO-tree family's step: tree rollouts, node values, edge advantages (docs/algorithms.md §2.2).

Segment Policy Optimization, tree form (``algo.advantage=spo_tree``), in one training step:

- **draw**: the next ``train.prompts_per_step`` prompts of the shuffled stream (uniform); each is the
  root of one tree.
- **rollout** (rank 0): the trees, one depth at a time. A node at depth d (the root is the prompt,
  depth 0) gets ``algo.segment.branching[d]`` children, each generated on the engine token-in from the
  node's exact prefix (prompt ids + every segment on its path), with the agent loop's sampling, through
  a scheduler with the phase's concurrency, retries and reward. A child gets at most
  ``algo.segment.segment_len`` new tokens, except at the last depth, where it runs to the end (the
  response budget ``rollout.max_response_len``, counted from the response start). A child that stopped
  on its own, that hit the budget, or that sits at the last depth is a leaf, rewarded by the phase's
  reward on its whole response; a child cut at the segment length is expanded again (and is not
  rewarded). V(leaf) = its reward, V(node) = the mean of its children's V
  (:func:`~megatron_spo.algos.segment_tree.node_values`); every parent → child edge gets
  ``algo.segment.tree_advantage`` (``rloo``: V(child) − V(parent); ``grpo``: that over the siblings'
  std + 1e-8, :func:`~megatron_spo.algos.segment_tree.edge_advantages`); zero-advantage edges are
  filtered (:func:`~megatron_spo.algos.segment_tree.filter_zero_advantage_edges`). **Each kept edge is
  one training row**, as in the reference: the query is the parent's full ids, the response is the
  child's segment with the engine's log-probs; ``sample.meta[TREE_ADVANTAGE]`` holds its advantage and
  ``sample.reward`` is V(child) (so the loop's ``reward/mean`` is the mean V(child) of the trained edges;
  ``rollout/reward_mean`` is over the leaves).
- **advantages**: each edge row's advantage on every token of its segment; the probability mask of
  SPO-chain (only tokens sampled with ``p < algo.segment.prob_threshold`` train, ``batch["loss_mask"]``
  narrowed in place) and the masked global whitening
  (:func:`~megatron_spo.algos.segment_chain.whiten_segment_advantages`), as §2.2(c) prescribes.
- **after the update**: nothing; **state**: none beyond the loop's prompt stream (every engine call
  is seeded from its sample uid, so a resumed run regenerates the same trees).

Metrics: ``segment/tree_nodes`` (generated nodes), ``segment/leaves``, ``segment/edges``,
``segment/edges_filtered``, ``segment/edges_trained``, ``segment/tokens_trained``,
``segment/tokens_masked``, ``segment/continuation_tokens`` (tokens of segments below depth 1, generated
from a node's prefix; ``rollout/tokens_generated`` counts the depth-1 segments, generated from the
prompt, so their sum is every generated token, as for SPO-chain), ``segment/continuation_errors``.

Only the single-turn agent is supported (:meth:`SegmentTreeStep.check_config` refuses the tool loops).

Deviations from the reference, on purpose:

1. **No on-policy replay buffer.** The reference stores edges for up to 8 iterations and trains ≤ 32
   per question per iteration (:class:`~megatron_spo.algos.segment_tree.OnPolicyReplayBuffer`); here a
   step trains exactly the edges its own trees produced (fully on-policy, no family state to resume).
2. **p comes from the engine** (as in SPO-chain item 1): the probability mask and the whitening use
   the engine's log-prob of each sampled token, not a trainer re-score.
3. **Failures.** A child whose generation failed (engine error after retries) is left out of its
   parent's children (counted in ``segment/continuation_errors``); a node whose every child failed is
   graded as a leaf with the reward of its own (truncated) response; a root whose every child failed
   gives no edges.
4. **Too few rows.** A batch needs ``train.updates_per_step`` rows per data-parallel rank. When fewer
   edges survive the filter than ``updates_per_step`` × the world size, filtered edges (advantage 0) are
   added back in tree order, marked ``sample.meta[TREE_FILLER]``; they stay out of the whitening
   statistics and carry advantage 0, so they only give the loss tokens to normalise by.
5. **Nothing below the threshold** on the edges that carry signal: every advantage is 0 and the loss
   mask is kept (SPO-chain item 4). An edge row with no low-probability token keeps its first token in
   the loss, with advantage 0: edge rows are short, and a micro-batch (or mini-batch) holding only such
   rows would leave the actor no token to normalise by. Those tokens count in the token-mean
   normaliser (``segment/tokens_trained`` includes them); small runs use ``train.updates_per_step=1``.
6. Rewards are computed for leaves only; a child that will be expanded skips the reward call.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_spo.algos.segment_chain import keep_a_token_per_row, probability_mask, whiten_segment_advantages
from megatron_spo.algos.segment_tree import Edge, SegmentTree, edge_advantages, filter_zero_advantage_edges
from megatron_spo.config import Config, ConfigError
from megatron_spo.rollout.agent_loop import finish, model_turn, room_for_turn, start_sample
from megatron_spo.rollout.engine import Engine
from megatron_spo.rollout.sample import RolloutRequest, Sample
from megatron_spo.rollout.scheduler import RolloutScheduler, SchedulerConfig
from megatron_spo.trainer.algorithm import AlgorithmStep, Draw
from megatron_spo.trainer.segment_chain import token_probs
from megatron_spo.trainer.train_batch import ok_mask

if TYPE_CHECKING:
    from megatron_spo.rollout.phase import RolloutBatch, RolloutPhase

# sample.meta keys of an edge row: its edge advantage (before mask and whitening), its (parent, child)
# node indices in its tree, and True on rows added back only to fill the batch (module docstring item 4).
TREE_ADVANTAGE = "tree_advantage"
TREE_EDGE = "tree_edge"
TREE_FILLER = "tree_filler"
# request.meta: the node's response prefix (ids, log-probs) and its children's new-token cap (None: to
# the end); sample.meta: the child was cut at the segment length and will be expanded.
_PREFIX = "tree_prefix"
_CAP = "tree_cap"
_EXPAND = "tree_expand"


@dataclass
class _Grown:
    """One tree being built: the tree, its root request and, per node, what generated it.

    ``logprobs[i]`` is node i's segment log-probs, ``samples[i]`` the sample whose response ends
    with node i (None for the root).
    """

    tree: SegmentTree
    root: RolloutRequest
    logprobs: List[List[float]]
    samples: List[Optional[Sample]]


class SegmentTreeStep(AlgorithmStep):
    """SPO-tree (``algo.advantage=spo_tree``); see the module docstring."""

    names = ("spo_tree",)

    @classmethod
    def samples_per_prompt(cls, cfg: Config) -> int:
        """Leaves of a full tree (the most complete responses one prompt can give)."""
        out = 1
        for b in cfg.algo.segment.branching:
            out *= b
        return out

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.rollout.agent != "single_turn":
            raise ConfigError(
                f"algo.advantage=spo_tree supports only rollout.agent=single_turn, got rollout.agent="
                f"{cfg.rollout.agent!r}: tree segments over tool calls are not implemented")

    def draw(self, metrics: Dict[str, float]) -> Draw:
        records = [self.dataset[i] for i in self.stream.take(self.cfg.train.prompts_per_step)]
        return Draw(records, self.cfg.algo.segment.branching[0], "single_stream")

    def advantages(self, draw: Draw, samples: List[Sample], batch: Dict[str, torch.Tensor],
                   metrics: Dict[str, float]) -> torch.Tensor:
        """``[B, T]`` whitened edge advantages; narrows ``batch["loss_mask"]`` to tokens with p < threshold."""
        loss_mask = batch["loss_mask"]
        raw, signal = edge_table(samples, tuple(loss_mask.shape))
        stats = signal * loss_mask  # the edges that carry signal: filler rows stay out of the statistics
        threshold = self.cfg.algo.segment.prob_threshold
        probs = token_probs(batch["rollout_logp"])
        low = probability_mask(probs, threshold, loss_mask)
        if not bool((low & stats.bool()).any()):  # module docstring item 5: zeros, mask kept
            metrics.update({"segment/tokens_trained": float(loss_mask.sum()), "segment/tokens_masked": 0.0})
            return torch.zeros_like(loss_mask, dtype=torch.float32)
        adv = whiten_segment_advantages(raw * low, stats, probs, threshold=threshold)
        trained = keep_a_token_per_row(loss_mask, low.to(loss_mask.dtype))
        metrics["segment/tokens_masked"] = float(loss_mask.sum() - trained.sum())
        metrics["segment/tokens_trained"] = float(trained.sum())
        loss_mask.copy_(trained)
        return adv.to(torch.float32)

    # ---- rollout: the trees, depth by depth -----------------------------------------------------

    def rollout(self, phase: "RolloutPhase", draw: Draw, uid_prefix: str) -> "RolloutBatch":
        from megatron_spo.rollout.phase import RolloutBatch, batch_metrics

        seg = self.cfg.algo.segment
        start = time.monotonic()
        roots, skipped = phase.prepare(draw.records, seg.branching[0], uid_prefix)
        trees = [_Grown(SegmentTree(r.prompt_ids, question_id=r.meta["record"]), r, [[]], [None]) for r in roots]
        frontier = [(t, 0) for t in range(len(trees))]
        errors = 0
        for depth, width in enumerate(seg.branching):
            cap = None if depth == len(seg.branching) - 1 else seg.segment_len
            requests = [expand_request(trees[t], node, width, cap) for t, node in frontier]
            children = _on_phase_loop(phase, self._children(phase, requests)) if requests else []
            frontier, failed = attach_children(trees, frontier, requests, children)
            errors += failed
        for g in trees:  # a node whose every child failed: graded as a leaf (module docstring item 3)
            for i, node in enumerate(g.tree.nodes[1:], start=1):
                if not node.children and node.reward is None:
                    phase.reward(g.samples[i])
                    node.reward = float(g.samples[i].reward or 0.0)
        rows, counts = edge_rows(trees, seg.tree_advantage, self.cfg.train.updates_per_step * _world_size())
        leaves = [g.samples[i] for g in trees for i in range(1, len(g.tree)) if g.tree.is_leaf(i)]
        seconds = time.monotonic() - start
        depth1 = sum(len(g.tree.nodes[c].token_ids) for g in trees for c in g.tree.nodes[0].children)
        metrics = batch_metrics(leaves, seconds)
        metrics.update({
            "rollout/tokens_generated": float(depth1),
            "rollout/tokens_per_s": (depth1 + counts["tokens"]) / seconds if seconds > 0 else 0.0,
            "rollout/prompts": float(len(roots)),
            "rollout/skipped_prompts": float(len(skipped)),
            "segment/tree_nodes": float(sum(len(g.tree) - 1 for g in trees)),
            "segment/leaves": float(len(leaves)),
            "segment/edges": float(counts["edges"]),
            "segment/edges_filtered": float(counts["filtered"]),
            "segment/edges_trained": float(len(rows)),
            "segment/continuation_tokens": float(counts["tokens"] - depth1),
            "segment/continuation_errors": float(errors),
            "segment/seconds": seconds,
        })
        return RolloutBatch(rows, metrics, skipped)

    async def _children(self, phase: "RolloutPhase", requests: List[RolloutRequest]) -> List[Sample]:
        """Every child of ``requests``, scheduled with the phase's concurrency and retries; leaves rewarded."""
        loop = phase.loop

        async def grow(engine: Engine, request: RolloutRequest, index: int) -> Sample:
            sample = start_sample(request, index, list(request.prompt_ids or []))
            sample.append_model_tokens(*(list(x) for x in request.meta[_PREFIX]))  # the node's exact prefix
            cap = request.meta[_CAP]
            turn = await model_turn(engine, sample, loop.cfg,
                                    lambda room: loop.sampling(room if cap is None else min(room, cap)))
            if turn is None:  # only a node with room is expanded: this is an empty budget
                return sample.fail(f"sample {sample.uid}: no room left to generate a segment")
            sample.finish_reason = "length" if turn[1] == "length" else "stop"
            # cut at the segment length with budget left: an inner node, expanded at the next depth
            sample.meta[_EXPAND] = cap is not None and turn[1] == "length" and room_for_turn(sample, loop.cfg) > 0
            return finish(sample, loop.tokenizer)

        def reward_leaves(sample: Sample) -> None:
            if not sample.meta.get(_EXPAND):
                phase.reward(sample)

        config = SchedulerConfig(max_concurrency=phase.cfg.max_concurrency, max_retries=phase.max_retries)
        sched = RolloutScheduler(phase.engine, grow, config, reward_fn=reward_leaves)
        total = 0
        for req in requests:
            sched.submit(req)
            total += req.n
        try:
            return list(await sched.get_batch(total))
        finally:
            await sched.aclose()

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def expand_request(g: _Grown, node: int, n: int, cap: Optional[int]) -> RolloutRequest:
    """``n`` children of ``node`` of tree ``g``: continuations of its exact prefix, at most ``cap`` new tokens."""
    path: List[int] = []
    i: Optional[int] = node
    while i:  # the root (0) holds the prompt, not response tokens
        path.append(i)
        i = g.tree.nodes[i].parent
    ids = [t for j in reversed(path) for t in g.tree.nodes[j].token_ids]
    lps = [lp for j in reversed(path) for lp in g.logprobs[j]]
    root = g.root
    uid = root.uid if node == 0 else f"{root.uid}n{node}"
    return RolloutRequest(uid=uid, prompt_ids=list(root.prompt_ids), ground_truth=root.ground_truth, key=root.key,
                          n=n, meta={**root.meta, _PREFIX: (ids, lps), _CAP: cap})


def attach_children(trees: List[_Grown], frontier: Sequence[Tuple[int, int]], requests: Sequence[RolloutRequest],
                    children: Sequence[Sample]) -> Tuple[List[Tuple[int, int]], int]:
    """Add ``children`` to their parents (in request, then replica order, whatever the finishing order).

    Returns the next frontier ``[(tree, node)]`` (children to expand) and the number of failed children.
    """
    order = {r.uid: q for q, r in enumerate(requests)}
    nxt: List[Tuple[int, int]] = []
    failed = 0
    for c in sorted(children, key=lambda s: (order[s.request_uid], s.group_index)):
        q = order[c.request_uid]
        if not c.ok:
            failed += 1
            continue
        t, parent = frontier[q]
        g = trees[t]
        start = len(requests[q].meta[_PREFIX][0])
        expand = bool(c.meta.get(_EXPAND))
        child = g.tree.add_child(parent, c.response_ids[start:], finished=c.finish_reason == "stop",
                                 reward=None if expand else float(c.reward or 0.0))
        g.logprobs.append(list(c.rollout_logprobs[start:]))
        g.samples.append(c)
        if expand:
            nxt.append((t, child))
    return nxt, failed


def edge_rows(trees: Sequence[_Grown], method: str, min_rows: int) -> Tuple[List[Sample], Dict[str, int]]:
    """One training row per kept edge of every tree (tree, then child order), plus filler rows.

    Returns the rows and counts: ``edges`` (all), ``filtered`` (zero advantage), ``tokens`` (every
    generated segment token).
    """
    kept: List[Tuple[_Grown, Edge, bool]] = []
    dropped: List[Tuple[_Grown, Edge, bool]] = []
    counts = {"edges": 0, "filtered": 0, "tokens": 0}
    for g in trees:
        counts["tokens"] += sum(len(n.token_ids) for n in g.tree.nodes[1:])
        if not g.tree.nodes[0].children:  # every child of the root failed
            continue
        edges = edge_advantages(g.tree, method)
        survivors = {e.child for e in filter_zero_advantage_edges(edges)}
        counts["edges"] += len(edges)
        counts["filtered"] += len(edges) - len(survivors)
        for e in edges:
            (kept if e.child in survivors else dropped).append((g, e, e.child not in survivors))
    kept += dropped[:max(0, min_rows - len(kept))]
    return [edge_sample(g, e, filler) for g, e, filler in kept], counts


def edge_sample(g: _Grown, e: Edge, filler: bool) -> Sample:
    """The training row of edge ``e``: query = the parent's full ids, response = the child's segment."""
    src = g.samples[e.child]
    start = len(src.response_ids) - len(e.response_ids)
    meta = {"record": g.root.meta["record"], "row": g.root.meta.get("row"),
            TREE_ADVANTAGE: 0.0 if filler else e.advantage, TREE_EDGE: (e.parent, e.child), TREE_FILLER: filler}
    return Sample(uid=f"{g.root.uid}e{e.child}", request_uid=g.root.uid, group_index=e.child, key=g.root.key,
                  prompt_ids=list(e.query_ids), response_ids=list(e.response_ids),
                  loss_mask=list(src.loss_mask[start:]), rollout_logprobs=list(g.logprobs[e.child]),
                  finish_reason=src.finish_reason, weight_versions=list(src.weight_versions),
                  ground_truth=g.root.ground_truth, reward=e.value, meta=meta)


def edge_table(samples: Sequence[Sample], shape: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` float64 edge advantages on each row's response tokens, and ``[B, T]`` float32 1 on the
    response positions of rows that carry signal (ok, not filler). Failed rows are 0 in both."""
    raw = torch.zeros(shape, dtype=torch.float64)
    signal = torch.zeros(shape, dtype=torch.float32)
    for i, (s, ok) in enumerate(zip(samples, ok_mask(samples).tolist())):
        if ok and TREE_ADVANTAGE not in s.meta:
            raise ValueError(f"sample {s.uid} has no edge advantage: spo_tree samples come from "
                             "SegmentTreeStep.rollout")
        if ok and s.response_ids:
            span = slice(len(s.prompt_ids), len(s.prompt_ids) + len(s.response_ids))
            raw[i, span] = float(s.meta[TREE_ADVANTAGE])
            signal[i, span] = 0.0 if s.meta.get(TREE_FILLER) else 1.0
    return raw, signal


def _world_size() -> int:
    """Ranks of the job (an upper bound of the data-parallel size), 1 outside a distributed run."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _on_phase_loop(phase: "RolloutPhase", coro) -> Any:
    """Run ``coro`` on the phase's event loop, opened here as ``RolloutPhase.run`` would (and closed with the
    phase): HTTP engine clients keep a connection pool per event loop, and the tree never calls ``run``."""
    if phase._event_loop is None or phase._event_loop.is_closed():
        phase._event_loop = asyncio.new_event_loop()
    return phase._event_loop.run_until_complete(coro)
