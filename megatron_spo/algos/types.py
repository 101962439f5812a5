"""Small result types shared by the algorithm functions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch


@dataclass
class LossOutput:
    """A policy loss before global normalisation.

    The caller divides ``loss_sum`` by a normaliser summed over **all** micro-batches and
    data-parallel ranks of the optimizer step, so the loss (and its gradient) does not depend on
    how the batch was split::

        loss = sum_over_microbatches(out.loss_sum) / sum_over_microbatches_and_ranks(out.normaliser)

    Attributes:
        loss_sum: scalar tensor with grad, the un-normalised loss of this micro-batch.
        normaliser: scalar tensor (no grad), this micro-batch's share of the denominator; what it
            counts depends on the aggregation mode (valid tokens for token-mean, sequences for the
            seq-mean modes).
        metrics: detached scalar tensors, each a **sum** over this micro-batch together with its own
            count under ``<name>/count`` where a mean is wanted, so metrics also reduce globally.
    """

    loss_sum: torch.Tensor
    normaliser: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)

    def loss(self) -> torch.Tensor:
        """The loss normalised by this micro-batch alone (for single-batch use and tests)."""
        return self.loss_sum / self.normaliser.clamp_min(1e-12)
