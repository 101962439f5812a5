"""From rewarded samples to the actor's batch: padded tensors, rewards, mini-batches, mismatch sums.

Every rank holds the whole step's samples (rank 0 rolls out and broadcasts them), so the algorithm
family computes advantages once over the whole batch, identically on every rank, and each
data-parallel rank then takes its contiguous share. A failed sample (``finish_reason == "error"``) stays in the batch
with an all-zero loss mask and advantage 0: it trains nothing, keeps the batch divisible by the DP
size, and is counted in the metrics; it is also left out of the advantage statistics and of the
tracker update.

Batch layout (see ``megatron_spo.megatron.batching``): rows are ``prompt_ids + response_ids``,
right-padded to the longest row; ``loss_mask``, ``rollout_logp`` and ``advantages`` are aligned to
tokens (``logp[:, t]`` is the log-prob of ``input_ids[:, t]``), so the prompt's positions are 0.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from megatron_spo.rollout.sample import Sample


def collate(samples: Sequence[Sample], pad_id: int) -> Dict[str, torch.Tensor]:
    """Pad samples into ``input_ids``/``loss_mask``/``rollout_logp`` ``[B, T]`` and ``lengths`` ``[B]``."""
    if not samples:
        raise ValueError("collate: no samples")
    rows = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    width = max(len(r) for r in rows)
    n = len(samples)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.float32)
    rollout_logp = torch.zeros((n, width), dtype=torch.float32)
    for i, (s, row) in enumerate(zip(samples, rows)):
        s.check()
        if not s.prompt_ids:
            raise ValueError(f"sample {s.uid}: empty prompt")
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        if s.ok:
            p, r = len(s.prompt_ids), len(s.response_ids)
            loss_mask[i, p:p + r] = torch.tensor(s.loss_mask, dtype=torch.float32)
            rollout_logp[i, p:p + r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return {"input_ids": input_ids, "lengths": lengths, "loss_mask": loss_mask, "rollout_logp": rollout_logp}


def rewards_of(samples: Sequence[Sample]) -> torch.Tensor:
    """``[B]`` float64 rewards (a failed sample's is 0); a missing reward is an error naming the sample."""
    out = []
    for s in samples:
        if s.reward is None:
            raise ValueError(f"sample {s.uid} has no reward (the reward step did not run on it)")
        out.append(float(s.reward))
    return torch.tensor(out, dtype=torch.float64)


def ok_mask(samples: Sequence[Sample]) -> torch.Tensor:
    """``[B]`` bool: samples that finished without error (and so train and update the tracker)."""
    return torch.tensor([s.ok for s in samples], dtype=torch.bool)


def mini_batches(batch: Dict[str, torch.Tensor], count: int) -> List[Dict[str, torch.Tensor]]:
    """Split a rank-local batch into ``count`` contiguous mini-batches (one optimizer step each).

    Rows are dealt as evenly as possible; ``count`` larger than the rows is an error.
    """
    n = batch["input_ids"].shape[0]
    if not 1 <= count <= n:
        raise ValueError(f"cannot split {n} sequences into {count} mini-batches (train.updates_per_step)")
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [{k: (v[a:b] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
            for a, b in zip(bounds[:-1], bounds[1:])]


def mismatch_sums(old_logp: torch.Tensor, rollout_logp: torch.Tensor, loss_mask: torch.Tensor) -> Dict[str, float]:
    """This shard's sums for the train/rollout log-prob mismatch on trained tokens (reduce, then
    :func:`finish_mismatch`): Σ(rollout − trainer), the token count and max |Δlogp|."""
    m = loss_mask.bool()
    diff = (rollout_logp - old_logp)[m].double()
    return {"kl_sum": float(diff.sum()), "tokens": float(m.sum()),
            "abs_diff_max": float(diff.abs().max()) if diff.numel() else 0.0}


def finish_mismatch(sums: Dict[str, float]) -> Dict[str, float]:
    """``mismatch/token_kl``: mean of ``rollout_logp − old_logp``, the k1 estimate of
    KL(π_rollout‖π_trainer) on rollout samples; ``mismatch/max_abs_logp_diff``."""
    tokens = sums["tokens"]
    return {"mismatch/token_kl": sums["kl_sum"] / tokens if tokens else 0.0,
            "mismatch/max_abs_logp_diff": sums["abs_diff_max"]}
