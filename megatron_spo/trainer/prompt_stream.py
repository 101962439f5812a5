"""An endless, seeded, epoch-shuffled stream of dataset positions with a resumable state.

The trainer draws each step's candidate pool (SPO) or batch (GRPO) from it: every epoch is a fresh
permutation of the dataset, and ``state_dict`` holds the epoch, the position inside it and the
generator, so a resumed run draws exactly the prompts the uninterrupted run would have drawn.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch


class PromptStream:
    """Positions ``0..size-1`` in shuffled epochs.

    Args:
        size: number of prompts in the dataset (> 0).
        seed: seed of the shuffling generator.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        if size <= 0:
            raise ValueError(f"PromptStream: the dataset is empty (size {size})")
        self.size = size
        self.epoch = 0
        self.position = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(size, generator=self._generator)

    def take(self, count: int) -> List[int]:
        """The next ``count`` positions; an epoch boundary inside the draw starts a new permutation.

        ``count`` may exceed the dataset size (positions then repeat across epochs).
        """
        if count <= 0:
            raise ValueError(f"PromptStream.take: count must be > 0, got {count}")
        out: List[int] = []
        while len(out) < count:
            if self.position == self.size:
                self.epoch += 1
                self.position = 0
                self._order = torch.randperm(self.size, generator=self._generator)
            step = min(count - len(out), self.size - self.position)
            out.extend(self._order[self.position:self.position + step].tolist())
            self.position += step
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"size": self.size, "epoch": self.epoch, "position": self.position,
                "order": self._order.clone(), "generator": self._generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(f"PromptStream: checkpoint was taken on a dataset of {state['size']} prompts, "
                             f"this one has {self.size}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = state["order"].clone()
        self._generator.set_state(state["generator"])
