"""SegPO SPO-tree: tree values, edge advantages, zero-advantage filter, on-policy replay buffer.

Formulas and constants: docs/algorithms.md §2.2.

Tree construction needs a rollout engine and lives with the rollout layer; this module holds the pure
pieces it feeds: a small tree structure, node values, edges with advantages, the edge filter and the
replay buffer. Token advantages come from broadcasting an edge's advantage over its response tokens,
then :func:`megatron_spo.algos.segment_chain.whiten_segment_advantages` (the same prob-masked global
whitening as the chain).

Deviations and choices:

1. **Children's std is the population std** (divide by n, numpy's default, as the treetune code base
   uses numpy for these statistics) — [UNVERIFIED] against the exact line. It only matters for
   ``method="grpo"``. A node with one child has std 0.
2. The ``"rloo"`` method is the reference's ``V(child) − V(parent)``; V(parent) includes the child
   itself, so it is not a true leave-one-out baseline. Kept as in the reference; the name is theirs.
3. ``"grpo"`` divides by (std of the parent's children + 1e-8): with std 0 this multiplies a zero
   difference, so siblings with identical values give 0, never NaN.
4. **First-segment quirk (docs/algorithms.md §6 item 6)** does not arise in the tree: the root's value
   is the mean of its children, so the first segments get ``V(child) − V(root)``.
5. The filter keeps an edge iff ``A + (BoK(V_child) − BoK(V_parent)) != 0`` with BoK(v) = 1 − (1 − v)^4,
   evaluated exactly as written (float comparison with 0). BoK is increasing, so this drops exactly the
   edges whose child and parent values are equal.
6. **Replay buffer age**: an edge added at iteration j is dropped at iteration i when i − j ≥ max_age
   (8), so the oldest data used is max_age − 1 = 7 iterations stale, as in the reference
   (docs/algorithms.md §2.2(d)). Sampling picks ``min(n, 32)`` edges per question uniformly without
   replacement with the buffer's own seeded ``torch.Generator`` (saved in ``state_dict``) and removes
   them. Questions are visited in first-seen order so a restored buffer reproduces the next draw exactly.
7. Leaves must carry a finite reward (a node that hit the depth limit unfinished is a leaf graded by the
   caller, e.g. with the unfinished penalty 0). Rewards stored on internal nodes are ignored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Hashable, Iterable, List, Optional

import torch


@dataclass
class TreeNode:
    """One node: the segment of tokens that leads to it from its parent.

    Attributes:
        token_ids: the segment's token ids (the prompt ids for the root).
        parent: parent index, None for the root.
        depth: 0 for the root.
        finished: the segment ended naturally (finish reason ≠ length).
        reward: outcome reward, required on leaves.
        children: indices of the children, in creation order.
    """

    token_ids: List[int]
    parent: Optional[int]
    depth: int
    finished: bool = False
    reward: Optional[float] = None
    children: List[int] = field(default_factory=list)


class SegmentTree:
    """A rooted tree of segments for one question. Node 0 is the root (the prompt).

    Nodes are appended, so a parent's index is always smaller than its children's.
    """

    def __init__(self, prompt_ids: Iterable[int], question_id: Hashable = 0) -> None:
        self.question_id = question_id
        self.nodes: List[TreeNode] = [TreeNode(token_ids=[int(t) for t in prompt_ids], parent=None, depth=0)]

    def add_child(
        self, parent: int, token_ids: Iterable[int], *, finished: bool, reward: Optional[float] = None
    ) -> int:
        """Append a child of ``parent`` and return its index."""
        if not isinstance(parent, int) or not 0 <= parent < len(self.nodes):
            raise IndexError(f"SegmentTree.add_child: parent {parent!r} is not a node index in [0, {len(self.nodes)})")
        node = TreeNode(
            token_ids=[int(t) for t in token_ids],
            parent=parent,
            depth=self.nodes[parent].depth + 1,
            finished=bool(finished),
            reward=None if reward is None else float(reward),
        )
        self.nodes.append(node)
        index = len(self.nodes) - 1
        self.nodes[parent].children.append(index)
        return index

    def __len__(self) -> int:
        return len(self.nodes)

    def is_leaf(self, index: int) -> bool:
        return not self.nodes[index].children

    def full_ids(self, index: int) -> List[int]:
        """Prompt ids followed by every segment on the path root → ``index`` (the node's full text)."""
        path = []
        i: Optional[int] = index
        while i is not None:
            path.append(i)
            i = self.nodes[i].parent
        out: List[int] = []
        for j in reversed(path):
            out.extend(self.nodes[j].token_ids)
        return out


@dataclass
class NodeValues:
    """``value[i]``: V of node i; ``std[i]``: population std of its children's V (0 for leaves). ``[N]`` float64."""

    value: torch.Tensor
    std: torch.Tensor


def node_values(tree: SegmentTree) -> NodeValues:
    """V(leaf) = its reward; V(node) = mean of its immediate children's V (docs/algorithms.md §2.2(b))."""
    n = len(tree.nodes)
    value = torch.zeros(n, dtype=torch.float64)
    std = torch.zeros(n, dtype=torch.float64)
    # Children always have larger indices than their parent, so a reverse sweep sees children first.
    for i in range(n - 1, -1, -1):
        node = tree.nodes[i]
        if not node.children:
            if node.reward is None or not math.isfinite(node.reward):
                raise ValueError(
                    f"node_values: leaf node {i} (depth {node.depth}) of question {tree.question_id!r} "
                    f"needs a finite reward, got {node.reward!r}"
                )
            value[i] = node.reward
            continue
        child_v = value[torch.as_tensor(node.children, dtype=torch.long)]
        value[i] = child_v.mean()
        std[i] = child_v.std(correction=0)
    return NodeValues(value=value, std=std)


def bok(v, k: int = 4):
    """Best-of-k success probability ``1 − (1 − v)^k`` (float or tensor in, same type out)."""
    return 1.0 - (1.0 - v) ** k


@dataclass
class Edge:
    """A parent → child training sample.

    Attributes:
        question_id: the tree's question.
        parent, child: node indices.
        query_ids: full ids of the parent (prompt + segments), the query.
        response_ids: the child's segment, the response; the advantage applies to all of its tokens.
        advantage: the segment advantage.
        value: V(child); parent_value: V(parent).
        iteration: the iteration the edge entered the replay buffer (−1 before that).
    """

    question_id: Any
    parent: int
    child: int
    query_ids: List[int]
    response_ids: List[int]
    advantage: float
    value: float
    parent_value: float
    iteration: int = -1


def edge_advantages(
    tree: SegmentTree, method: str = "rloo", *, values: Optional[NodeValues] = None, eps: float = 1e-8
) -> List[Edge]:
    """Every edge of the tree with its advantage (docs/algorithms.md §2.2(c)), in child-index order.

    ``method="rloo"``: ``A = V(child) − V(parent)``. ``method="grpo"``: ``A = (V(child) − V(parent)) /
    (std of the parent's children's V + eps)``.
    """
    if method not in ("rloo", "grpo"):
        raise ValueError(f"edge_advantages: method must be 'rloo' or 'grpo', got {method!r}")
    nv = node_values(tree) if values is None else values
    if nv.value.shape != (len(tree),):
        raise ValueError(f"edge_advantages: values cover {nv.value.shape[0]} nodes but the tree has {len(tree)}")
    edges = []
    for c in range(1, len(tree)):
        p = tree.nodes[c].parent
        diff = float(nv.value[c] - nv.value[p])
        adv = diff if method == "rloo" else diff / (float(nv.std[p]) + eps)
        edges.append(
            Edge(
                question_id=tree.question_id,
                parent=p,
                child=c,
                query_ids=tree.full_ids(p),
                response_ids=list(tree.nodes[c].token_ids),
                advantage=adv,
                value=float(nv.value[c]),
                parent_value=float(nv.value[p]),
            )
        )
    return edges


def filter_zero_advantage_edges(edges: Iterable[Edge], k: int = 4) -> List[Edge]:
    """Keep edges with ``A + BoK(V_child) − BoK(V_parent) != 0`` (``only_adv_greater_than_zero``)."""
    kept = []
    for e in edges:
        score = e.advantage + (bok(e.value, k) - bok(e.parent_value, k))
        if score != 0.0:
            kept.append(e)
    return kept


class OnPolicyReplayBuffer:
    """Edges grouped by question, aged out after ``max_age`` iterations, sampled ≤ ``per_question`` each.

    Usage per iteration i: ``buf.add(new_edges, i)``, then ``batch = buf.sample(i)``.
    """

    def __init__(self, max_age: int = 8, per_question: int = 32, seed: int = 0) -> None:
        if max_age < 1:
            raise ValueError(f"OnPolicyReplayBuffer: max_age must be >= 1, got {max_age}")
        if per_question < 1:
            raise ValueError(f"OnPolicyReplayBuffer: per_question must be >= 1, got {per_question}")
        self.max_age = int(max_age)
        self.per_question = int(per_question)
        self._gen = torch.Generator().manual_seed(int(seed))
        self._by_question: Dict[Any, List[Edge]] = {}
        self._last_iteration: Optional[int] = None

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_question.values())

    def _check_iteration(self, iteration: int, fn: str) -> None:
        if self._last_iteration is not None and iteration < self._last_iteration:
            raise ValueError(
                f"OnPolicyReplayBuffer.{fn}: iteration {iteration} is earlier than the last one seen "
                f"({self._last_iteration}); iterations must not go backwards"
            )
        self._last_iteration = iteration

    def add(self, edges: Iterable[Edge], iteration: int) -> None:
        """Add edges tagged with ``iteration`` (copies; the inputs are not modified)."""
        self._check_iteration(iteration, "add")
        for e in edges:
            self._by_question.setdefault(e.question_id, []).append(replace(e, iteration=int(iteration)))

    def evict(self, iteration: int) -> int:
        """Drop edges with ``iteration − edge.iteration >= max_age``; return how many were dropped."""
        self._check_iteration(iteration, "evict")
        dropped = 0
        for q in list(self._by_question):
            kept = [e for e in self._by_question[q] if iteration - e.iteration < self.max_age]
            dropped += len(self._by_question[q]) - len(kept)
            if kept:
                self._by_question[q] = kept
            else:
                del self._by_question[q]
        return dropped

    def sample(self, iteration: int) -> List[Edge]:
        """Evict stale edges, then take (and remove) up to ``per_question`` random edges per question."""
        self.evict(iteration)
        out: List[Edge] = []
        for q in list(self._by_question):
            pool = self._by_question[q]
            order = torch.randperm(len(pool), generator=self._gen).tolist()
            take = set(order[: self.per_question])
            out.extend(pool[j] for j in order[: self.per_question])
            rest = [e for j, e in enumerate(pool) if j not in take]
            if rest:
                self._by_question[q] = rest
            else:
                del self._by_question[q]
        return out

    def state_dict(self) -> Dict[str, Any]:
        """Plain types and one uint8 tensor (safe for ``torch.save`` / ``torch.load(weights_only=True)``)."""
        return {
            "max_age": self.max_age,
            "per_question": self.per_question,
            "last_iteration": self._last_iteration,
            "rng_state": self._gen.get_state(),
            "edges": [asdict(e) for pool in self._by_question.values() for e in pool],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("max_age", "per_question", "last_iteration", "rng_state", "edges"):
            if key not in state:
                raise KeyError(f"OnPolicyReplayBuffer.load_state_dict: missing key {key!r}")
        self.max_age = int(state["max_age"])
        self.per_question = int(state["per_question"])
        self._last_iteration = state["last_iteration"]
        self._gen.set_state(state["rng_state"])
        self._by_question = {}
        for i, d in enumerate(state["edges"]):
            try:
                e = Edge(**d)
            except TypeError as err:
                raise ValueError(f"OnPolicyReplayBuffer.load_state_dict: edges[{i}] is malformed: {err}") from None
            self._by_question.setdefault(e.question_id, []).append(e)
