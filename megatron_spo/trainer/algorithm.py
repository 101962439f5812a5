"""The algorithm-step interface: everything an algorithm family decides in one training step.

The loop (``megatron_spo.trainer.loop``) has one shape for every algorithm and never branches on an
algorithm's name. Per step it calls the family chosen by ``algo.advantage`` (see
``megatron_spo.trainer.registry``) at these points, in this order:

1. :meth:`AlgorithmStep.draw` (every rank, identically): which prompts, how many samples per prompt,
   how they are delivered (one stream of single samples, or complete groups), and whatever the
   family must read *at draw time* (SPO: the tracker's baseline v̂ of each drawn prompt).
2. :meth:`AlgorithmStep.rollout` (rank 0 only): turn the draw into rewarded samples on the engine
   fleet. The default asks the rollout phase for ``samples_per_prompt`` samples per prompt; a family
   that needs extra generations (SegPO's continuations from a prefix, a tree of rollouts) overrides
   it and still returns one list of samples.
3. :meth:`AlgorithmStep.advantages` (every rank, identically, on the whole batch): ``[B, T]``
   token-level advantages. Sequence-level families broadcast one value per sample over its trained
   tokens (:func:`sequence_to_tokens`); token-level ones (SegPO) fill each token.
4. The loop scores old log-probs and runs the policy update (identical for every family).
5. :meth:`AlgorithmStep.after_update` (every rank): what happens once the policy has moved (SPO: ρ
   with the updated policy, then the tracker update).
6. :meth:`AlgorithmStep.state_dict` / :meth:`load_state_dict` at checkpoints: the family's state
   (sampler, tracker) next to the loop's own (step, weight version, prompt stream).

A streaming loop fits the same calls: it draws with a smaller count as slots free up (the baseline
is stored with the draw, so a sample that finishes late is scored against the value its prompt had
when it was drawn), and passes the batch it assembled from finished samples to :meth:`advantages`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Sequence

import torch

from megatron_spo.config import Config
from megatron_spo.data import PromptDataset, PromptRecord
from megatron_spo.rollout.sample import Sample
from megatron_spo.trainer.prompt_stream import PromptStream

if TYPE_CHECKING:
    from megatron_spo.rollout.phase import RolloutBatch, RolloutPhase

# How the samples of one draw are delivered: each sample on its own as it finishes, or every
# prompt's samples together (group estimators need the whole group before any advantage).
DELIVERY_MODES = ("single_stream", "group")


@dataclass
class Draw:
    """The prompts of one step and how to roll them out.

    Attributes:
        records: the drawn prompts, in order (a prompt may appear more than once).
        samples_per_prompt: responses to generate for each record.
        delivery: one of :data:`DELIVERY_MODES`.
        baselines: ``[len(records)]`` float64 values read at draw time, for families whose
            advantage needs them (SPO's v̂); None otherwise.
    """

    records: List[PromptRecord]
    samples_per_prompt: int
    delivery: str
    baselines: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.delivery not in DELIVERY_MODES:
            raise ValueError(f"Draw.delivery must be one of {DELIVERY_MODES}, got {self.delivery!r}")

    def baseline_of(self, samples: Sequence[Sample]) -> torch.Tensor:
        """``[B]`` the draw-time baseline of each sample's prompt (``sample.meta["record"]``)."""
        if self.baselines is None:
            raise ValueError("this draw carries no baselines")
        return self.baselines[torch.tensor([int(s.meta["record"]) for s in samples], dtype=torch.long)]


@dataclass
class UpdateOutcome:
    """What the policy update of one step leaves for :meth:`AlgorithmStep.after_update`.

    Attributes:
        samples: the whole step's samples (every rank holds all of them).
        local: this rank's data-parallel shard of the batch (``input_ids``/``lengths``/
            ``loss_mask`` ``[b, T]`` ...), rows ``rows`` of the global batch.
        rows: the global batch row of each shard row.
        abs_logratio: per optimizer step of this policy update, the mean |log π_θ − log π_old| the
            actor measured on its mini-batch (one value per update, already global).
        pad_id: the tokenizer's padding id (for re-scoring stored rows).
    """

    samples: List[Sample]
    local: Dict[str, torch.Tensor]
    rows: List[int]
    abs_logratio: List[float]
    pad_id: int


class AlgorithmStep(ABC):
    """One algorithm family (see the module docstring for when the loop calls what).

    Args:
        cfg: the run's config.
        dataset: the training prompts.
        stream: the shuffled, resumable stream of dataset positions the family draws from.
    """

    #: the ``algo.advantage`` values this family implements
    names: ClassVar[Sequence[str]] = ()

    def __init__(self, cfg: Config, dataset: PromptDataset, stream: PromptStream) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.stream = stream

    # ---- configuration ------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def samples_per_prompt(cls, cfg: Config) -> int:
        """Responses generated per drawn prompt with this config."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Cross-key checks of this family, run before anything is built; raise ``ConfigError``."""

    # ---- the step -----------------------------------------------------------------------------

    @abstractmethod
    def draw(self, metrics: Dict[str, float]) -> Draw:
        """Step 1: this step's prompts (identical on every rank: same stream and sampler state)."""

    def rollout(self, phase: "RolloutPhase", draw: Draw, uid_prefix: str) -> "RolloutBatch":
        """Step 2 (rank 0): rewarded samples for ``draw`` from the rollout phase."""
        return phase.run(draw.records, draw.samples_per_prompt, mode=draw.delivery, uid_prefix=uid_prefix)

    @abstractmethod
    def advantages(self, draw: Draw, samples: List[Sample], batch: Dict[str, torch.Tensor],
                   metrics: Dict[str, float]) -> torch.Tensor:
        """Step 3: ``[B, T]`` float32 advantages aligned with ``batch["loss_mask"]`` (0 off trained tokens).

        ``batch`` is the whole step's collated batch (``megatron_spo.trainer.train_batch.collate``).
        Failed samples (``not sample.ok``) must get 0 and stay out of any statistics.

        A family may narrow ``batch["loss_mask"]`` in place (set entries to 0, never to 1) to keep
        tokens out of the loss; the loop trains with the narrowed mask (SPO-chain's probability mask:
        only tokens sampled with probability below the threshold are trained).
        """

    def after_update(self, actor: Any, outcome: UpdateOutcome, metrics: Dict[str, float]) -> None:
        """Step 5: react to the updated policy (default: nothing)."""

    # ---- checkpoints --------------------------------------------------------------------------

    @abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """The family's resumable state; stored in the checkpoint's caller state under these keys."""

    @abstractmethod
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (``state`` is the whole caller state: read your own keys)."""


def sequence_to_tokens(seq_adv: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` float32: each sample's advantage ``seq_adv`` ``[B]`` on its trained tokens, 0 elsewhere."""
    return seq_adv.to(torch.float32).unsqueeze(1) * loss_mask
