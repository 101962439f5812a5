"""The rollout engine protocol: token ids in, token ids + log-probs out.

Every engine (embedded CPU engine, SGLang client, vLLM client) implements :class:`Engine`. The
trainer and the agent loop only ever see this protocol, so generated text is never re-tokenised:
``GenerateResult.token_ids`` are the exact ids the engine sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request.

    ``top_k <= 0`` and ``top_p >= 1`` disable those filters. ``stop`` are strings that end the
    generation (kept in the output, as vLLM's ``include_stop_str_in_output`` / SGLang's
    ``no_stop_trim``); ``stop_token_ids`` end it on a token (also kept).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: Tuple[str, ...] = ()
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        # JSON bodies carry lists; keep the dataclass hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def check(self) -> None:
        """Raise :class:`RequestError` naming the first invalid field."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"sampling.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise RequestError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"sampling.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int):
            raise RequestError(f"sampling.top_k must be an int (<= 0 disables it), got {self.top_k!r}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise RequestError(f"sampling.stop[{i}] must be a non-empty string, got {s!r}")


FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class GenerateResult:
    """One finished (or aborted) generation.

    Attributes:
        token_ids: generated ids, ``[N]`` (prompt excluded).
        logprobs: log-prob of each generated id under the sampling distribution (after temperature,
            before top-p/top-k truncation), ``[N]``, same length as ``token_ids``.
        finish_reason: "stop" (eos, stop token or stop string), "length" (max_new_tokens or context
            full) or "abort" (interrupted, e.g. by a weight update; retry or drop).
        weight_version: the engine's weight version when the generation finished.
        prompt_len: number of prompt tokens.
    """

    token_ids: List[int]
    logprobs: List[float]
    finish_reason: str
    weight_version: int = 0
    prompt_len: int = 0
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"GenerateResult: {len(self.token_ids)} token ids but {len(self.logprobs)} log-probs"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"GenerateResult: finish_reason {self.finish_reason!r} not in {FINISH_REASONS}")


# A weight update is either buckets of HF-named full tensors (the streaming export of
# megatron_spo.convert) or a path to an HF checkpoint directory on disk.
NamedTensorBucket = Sequence[Tuple[str, torch.Tensor]]
WeightSource = Union[Iterable[NamedTensorBucket], str]


class EngineError(RuntimeError):
    """A request failed in a way the caller may retry on another engine (unreachable, 5xx, garbage)."""


class RequestError(ValueError):
    """A request no engine can serve (never retried): e.g. a prompt longer than the context window,
    a token id outside the vocabulary, invalid sampling settings. The message names the item."""


@runtime_checkable
class Engine(Protocol):
    """What the trainer, the fleet and the agent loop need from a rollout engine."""

    name: str

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> List[GenerateResult]:
        """Generate one continuation per prompt (token ids), in order."""
        ...

    async def agenerate(self, prompt: Sequence[int], sampling: SamplingParams,
                        request_id: Optional[str] = None) -> GenerateResult:
        """Generate one continuation for one prompt; concurrent calls may be batched by the engine.

        This is what the per-sample asynchronous scheduler and the agent loop call. ``request_id``
        (optional) names the request for aborts and for exactly-once delivery in a fleet; engines
        echo it in ``GenerateResult.meta["request_id"]``.
        """
        ...

    def update_weights(self, source: WeightSource, version: int) -> None:
        """Load new weights (named-tensor buckets or an HF directory) and set the weight version."""
        ...

    def pause(self) -> None:
        """Stop admitting new requests; in-flight ones finish or are aborted with finish_reason "abort"."""
        ...

    def resume(self) -> None:
        ...

    def health(self) -> bool:
        ...

    @property
    def weight_version(self) -> int:
        ...
