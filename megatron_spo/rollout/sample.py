"""The trajectory record one rollout produces, and the request that asks for it.

A :class:`Sample` is what the scheduler hands to the trainer. Its token lists are exactly what the
engine produced and what the tools appended (token-in/token-out: nothing is re-tokenised), so
``prompt_ids + response_ids`` is the sequence the trainer scores.

Shapes (per sample, plain Python lists):
    prompt_ids        [P]  prompt tokens (chat template + generation prompt)
    response_ids      [R]  model tokens and tool tokens, in order
    loss_mask         [R]  1 for model tokens, 0 for tool / template tokens
    rollout_logprobs  [R]  engine log-prob of each model token (after temperature); 0.0 for tool tokens
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# Why a trajectory ended (``Sample.finish_reason``):
#   "stop"                  the model ended its turn without calling a tool (eos or no code block)
#   "length"                the token budget (model + tool tokens) or the engine's max tokens was hit
#   "tool_overflow"         appending the tool output would have exceeded the budget (not appended)
#   "max_assistant_turns"   the assistant-turn limit was reached
#   "max_user_turns"        the tool/user-turn limit was reached
#   "error"                 the sample failed (``errors`` says why); it carries reward 0 and no tokens to train on
SAMPLE_FINISH_REASONS = ("stop", "length", "tool_overflow", "max_assistant_turns", "max_user_turns", "error")


@dataclass
class RolloutRequest:
    """One prompt to roll out.

    Attributes:
        uid: unique id of this request (the scheduler names errors by it).
        messages: chat messages, or ``None`` when ``prompt_ids`` are given directly. For the SPO
            code protocol this is the problem text's single user message (see ``agent_loop``).
        prompt_ids: pre-tokenised prompt; wins over ``messages`` when set.
        ground_truth: reference answer passed to the reward function.
        key: the prompt key the SPO tracker indexes by (stripped first user message by default).
        n: samples wanted for this prompt (1 in single-stream mode; the group size in group mode).
        meta: anything the reward function or the trainer wants back (data source, row index, ...).
    """

    uid: str
    messages: Optional[List[Dict[str, Any]]] = None
    prompt_ids: Optional[List[int]] = None
    ground_truth: Any = None
    key: Optional[str] = None
    n: int = 1
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.messages is None and self.prompt_ids is None:
            raise ValueError(f"RolloutRequest {self.uid!r}: needs messages or prompt_ids")
        if self.n < 1:
            raise ValueError(f"RolloutRequest {self.uid!r}: n must be >= 1, got {self.n}")
        if self.key is None and self.messages:
            first_user = next((m for m in self.messages if m.get("role") == "user"), None)
            if first_user is not None:
                self.key = str(first_user.get("content", "")).strip()


@dataclass
class Sample:
    """One finished trajectory (see the module docstring for the token-list shapes).

    Attributes:
        uid: ``"{request uid}/{replica index}"``.
        request_uid: the request this sample answers; ``group_index`` is its replica index (0..n-1).
        weight_versions: engine weight version of every generation call, in order (a resumed
            generation contributes one entry per segment). ``min_weight_version`` is the oldest.
        num_turns: assistant turns + tool turns + 1 (verl's convention).
        reward: filled by the reward step (``None`` until then).
        errors: human-readable errors: the sample error (finish_reason "error") and per-tool errors.
        metrics: per-sample counters (tool_calls, tool_errors, aborts_resumed, retries, regenerations,
            reward_errors, ...).
    """

    uid: str
    request_uid: str
    group_index: int = 0
    key: Optional[str] = None
    prompt_ids: List[int] = field(default_factory=list)
    response_ids: List[int] = field(default_factory=list)
    loss_mask: List[int] = field(default_factory=list)
    rollout_logprobs: List[float] = field(default_factory=list)
    response_text: str = ""
    assistant_turns: int = 0
    user_turns: int = 0
    finish_reason: str = "stop"
    weight_versions: List[int] = field(default_factory=list)
    ground_truth: Any = None
    reward: Optional[float] = None
    errors: List[str] = field(default_factory=list)
    metrics: Dict[str, float] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        return self.assistant_turns + self.user_turns + 1

    @property
    def min_weight_version(self) -> Optional[int]:
        return min(self.weight_versions) if self.weight_versions else None

    @property
    def ok(self) -> bool:
        return self.finish_reason != "error"

    def count(self, name: str, by: float = 1) -> None:
        self.metrics[name] = self.metrics.get(name, 0) + by

    def append_model_tokens(self, ids: List[int], logprobs: List[float]) -> None:
        """Append engine-generated tokens (loss mask 1, their rollout log-probs)."""
        if len(ids) != len(logprobs):
            raise ValueError(f"sample {self.uid}: {len(ids)} token ids but {len(logprobs)} log-probs")
        self.response_ids.extend(ids)
        self.loss_mask.extend([1] * len(ids))
        self.rollout_logprobs.extend(float(x) for x in logprobs)

    def append_context_tokens(self, ids: List[int]) -> None:
        """Append tool / template tokens (loss mask 0, log-prob 0.0): context, not policy output."""
        self.response_ids.extend(ids)
        self.loss_mask.extend([0] * len(ids))
        self.rollout_logprobs.extend([0.0] * len(ids))

    def fail(self, message: str) -> "Sample":
        """Mark the sample failed: finish_reason "error", reward 0, the message kept in ``errors``."""
        self.finish_reason = "error"
        self.errors.append(message)
        self.reward = 0.0
        return self

    def check(self) -> None:
        """Raise ValueError naming the sample if its lists disagree in length or values."""
        n = len(self.response_ids)
        if len(self.loss_mask) != n or len(self.rollout_logprobs) != n:
            raise ValueError(
                f"sample {self.uid}: response_ids [{n}], loss_mask [{len(self.loss_mask)}], "
                f"rollout_logprobs [{len(self.rollout_logprobs)}] differ in length"
            )
        bad = [i for i, m in enumerate(self.loss_mask) if m not in (0, 1)]
        if bad:
            raise ValueError(f"sample {self.uid}: loss_mask[{bad[0]}] = {self.loss_mask[bad[0]]} is not 0/1")
        if self.finish_reason not in SAMPLE_FINISH_REASONS:
            raise ValueError(f"sample {self.uid}: finish_reason {self.finish_reason!r} not in {SAMPLE_FINISH_REASONS}")
