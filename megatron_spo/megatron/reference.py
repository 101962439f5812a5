"""The frozen reference policy of the KL penalty (``algo.loss.kl_coef > 0``): the initial weights.

The reference is a second, forward-only :class:`~megatron_spo.megatron.actor.MegatronActor` with the
actor's layout (same parallel state, dtype, temperature and micro-batch budget), loaded once from the
HF weights of ``model.path`` and never updated: a resumed run gets the same reference as the
original one, whatever the checkpoint holds. Each step it scores the step's batch next to the
old log-probs, and the actor's loss adds ``kl_coef · KL(π_θ ‖ π_ref)`` from those ``ref_logp``.

Cost:

- memory: one more copy of this rank's model shard in the parameter dtype (bf16: 2 bytes per
  parameter on the rank), without gradients, DDP buffers or optimizer state (Adam with fp32 master
  weights costs the actor about 16 bytes per parameter, so the reference adds roughly an eighth of
  the actor's static memory); its activations live only during its forward;
- time: one more forward pass over the step's batch (no backward), about a third of an update's
  forward + backward over the same tokens.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch


class ReferencePolicy:
    """Frozen initial policy; :meth:`score` gives its per-token log-probs.

    Args:
        model_path: HF model directory (the actor's ``model.path``): its config and weights.
        actor_kwargs: the actor's keyword arguments that fix the layout and the log-probs
            (``micro_batch_tokens``, ``temperature``, ``params_dtype``, ``aux_loss_coef``, recompute
            settings, ...); ``optim`` and ``loss`` are not taken (forward-only).
    """

    def __init__(self, model_path: str, **actor_kwargs: Any) -> None:
        from megatron_spo.megatron.actor import MegatronActor
        from megatron_spo.megatron.export import load_hf_weights

        actor_kwargs.pop("optim", None)
        actor_kwargs.pop("loss", None)
        self.actor = MegatronActor(model_path, **actor_kwargs)
        load_hf_weights(self.actor.model, model_path)
        for chunk in self.actor.model:
            chunk.requires_grad_(False)

    @torch.no_grad()
    def score(self, batch: Dict[str, torch.Tensor], groups: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
        """``[B, T]`` reference log-probs of ``batch``'s tokens (position 0 and padding are 0), on every
        rank of the model-parallel group (the actor's ``score`` path)."""
        return self.actor.score(batch, groups)["logp"]

    def parameters_on_rank(self) -> int:
        """Parameters of this rank's reference shard (what the memory cost counts)."""
        return sum(p.numel() for chunk in self.actor.model for p in chunk.parameters())
