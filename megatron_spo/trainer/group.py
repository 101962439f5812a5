"""The group family's step: GRPO, Dr.GRPO and RLOO (docs/algorithms.md §4).

- **draw**: the next ``train.prompts_per_step`` prompts of the shuffled stream (uniform, no priority).
- **rollout**: ``algo.grpo.n`` responses per prompt, delivered as complete groups.
- **advantages**: the estimator registered under ``algo.advantage`` (``megatron_spo.algos.grpo``), with
  each prompt's samples as one group; the same value on every trained token of a response. Failed
  samples get 0 and are left out of their group's statistics.
- **after the update**: nothing; **state**: none beyond the loop's prompt stream.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from megatron_spo.algos.registry import get_advantage
from megatron_spo.config import Config
from megatron_spo.rollout.sample import Sample
from megatron_spo.trainer.algorithm import AlgorithmStep, Draw, sequence_to_tokens
from megatron_spo.trainer.train_batch import ok_mask, rewards_of


class GroupStep(AlgorithmStep):
    """GRPO (``algo.advantage=grpo``), Dr.GRPO (``dr_grpo``) and RLOO (``rloo``)."""

    names = ("grpo", "dr_grpo", "rloo")

    @classmethod
    def samples_per_prompt(cls, cfg: Config) -> int:
        return cfg.algo.grpo.n

    def draw(self, metrics: Dict[str, float]) -> Draw:
        records = [self.dataset[i] for i in self.stream.take(self.cfg.train.prompts_per_step)]
        return Draw(records, self.samples_per_prompt(self.cfg), "group")

    def estimator_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of the registered estimator for ``algo.advantage``."""
        name = self.cfg.algo.advantage
        if name == "grpo":
            return {"norm_by_std": self.cfg.algo.grpo.norm_by_std}
        if name == "rloo":
            # a group that lost all but one sample to errors has no leave-one-out baseline: advantage 0
            return {"singleton": "zero"}
        return {}

    def advantages(self, draw: Draw, samples: List[Sample], batch: Dict[str, torch.Tensor],
                   metrics: Dict[str, float]) -> torch.Tensor:
        rewards, ok = rewards_of(samples), ok_mask(samples)
        seq = torch.zeros_like(rewards)
        if bool(ok.any()):
            group_ids = torch.tensor([s.meta["record"] for s in samples])[ok]
            one = torch.ones(int(ok.sum()), 1)  # a one-token mask: the estimator broadcasts to it
            adv = get_advantage(self.cfg.algo.advantage)(rewards[ok], group_ids, one, **self.estimator_kwargs())
            seq[ok] = adv[:, 0].to(seq.dtype)
        return sequence_to_tokens(seq, batch["loss_mask"])

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass
