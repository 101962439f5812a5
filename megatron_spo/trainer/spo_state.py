"""SPO state the trainer keeps across steps: building the tracker and sampler, and the ρ step.

Every rank keeps an identical tracker and sampler: they start from the same prior and seed, and
each update is applied on every rank from data every rank holds (rewards of the whole batch, and ρ
inputs all-gathered from the data-parallel shards). So any rank's ``state_dict`` is the run's.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from megatron_spo.algos.spo_sampler import PrioritizedSampler, UniformSampler
from megatron_spo.algos.spo_tracker import ValueTracker
from megatron_spo.config import Config
from megatron_spo.run.offline_values import load_scores

log = logging.getLogger(__name__)


def build_tracker(cfg: Config, dataset_keys: Sequence[str]) -> ValueTracker:
    """The value tracker of ``algo.spo``: an offline prior where given, else Beta(½, ½) for every prompt.

    With an offline file, prompts missing from it are not tracked and get sampling weight 0 (spec
    §1.3); a file whose keys match no dataset prompt is an error (the keys were built differently).
    """
    s = cfg.algo.spo
    kwargs = dict(rho_type=s.rho_type, rho_mode=s.rho_mode, rho_min=s.rho_min, rho_max=s.rho_max,
                  d_half=s.d_half, rho_constant=s.rho_constant)
    unique = list(dict.fromkeys(dataset_keys))
    if s.offline_values:
        scores = load_scores(s.offline_values, expected_keys=unique)
        wanted = set(unique)
        kept = {k: v for k, v in scores.items() if k in wanted}
        generator = torch.Generator().manual_seed(cfg.train.seed)
        tracker = ValueTracker.from_offline_scores(kept, n=s.offline_n, generator=generator, **kwargs)
        missing = len(wanted) - len(kept)
        if missing:
            log.warning("offline values: %d of %d dataset prompts have no scores and will not be sampled",
                        missing, len(wanted))
        return tracker
    tracker = ValueTracker(**kwargs)
    tracker.add(unique, 0.5, 0.5)
    return tracker


def build_sampler(cfg: Config, tracker: Optional[ValueTracker]):
    """Prioritized sampling for SPO, uniform for the group estimators."""
    if cfg.algo.advantage == "spo":
        return PrioritizedSampler(tracker, eps=cfg.algo.spo.sampling_eps, thompson=cfg.algo.spo.thompson,
                                  seed=cfg.train.seed)
    return UniformSampler(seed=cfg.train.seed)


def _stored_batch(stored: Sequence[Dict[str, torch.Tensor]], pad_id: int) -> Dict[str, torch.Tensor]:
    width = max(int(s["input_ids"].shape[0]) for s in stored)
    ids = torch.full((len(stored), width), int(pad_id), dtype=torch.long)
    for i, s in enumerate(stored):
        ids[i, : s["input_ids"].shape[0]] = s["input_ids"]
    lengths = torch.tensor([int(s["input_ids"].shape[0]) for s in stored], dtype=torch.long)
    return {"input_ids": ids, "lengths": lengths, "loss_mask": torch.zeros(ids.shape, dtype=torch.float32)}


def exact_rho_inputs(actor, tracker: ValueTracker, keys: Sequence[str], rows: Sequence[int],
                     batch: Dict[str, torch.Tensor], pad_id: int) -> Tuple[Dict[int, Any], Dict[int, Any]]:
    """This rank's share of the exact-ρ work (spec §1.7), after the step's policy update.

    Re-scores the stored past rows of this shard's prompts with the updated policy (the distance
    input) and scores the shard's current rows (what the tracker remembers for next time): the two
    extra forward passes of the reference.

    Args:
        keys: prompt key of each row of ``batch`` (this rank's shard).
        rows: the global batch row of each shard row (for gathering across ranks).
        batch: this rank's shard (``input_ids``, ``lengths``, ``loss_mask``).

    Returns:
        ``({row: logp_now of the stored row or None}, {row: (input_ids [L], logp [L], mask [L])})``.
    """
    stored = tracker.stored_rows(keys)
    have = [i for i, s in enumerate(stored) if s is not None]
    now: Dict[int, Any] = {rows[i]: None for i in range(len(keys))}
    if have:
        past = _stored_batch([stored[i] for i in have], pad_id)
        logp = actor.score(past)["logp"]
        for j, i in enumerate(have):
            now[rows[i]] = logp[j, : int(past["lengths"][j])].clone()
    after = actor.score(batch)["logp"]
    remember: Dict[int, Any] = {}
    for i in range(len(keys)):
        length = int(batch["lengths"][i])
        remember[rows[i]] = (batch["input_ids"][i, :length].clone(), after[i, :length].clone(),
                             batch["loss_mask"][i, :length].bool().clone())
    return now, remember


def exact_rho(tracker: ValueTracker, keys: Sequence[str], now: Dict[int, Any], rows: Sequence[int]) -> torch.Tensor:
    """``[B]`` ρ for ``keys`` (global batch rows ``rows``) from the gathered re-scores of their stored rows."""
    return tracker.rho(keys, [now[r] for r in rows])


def remember_rows(tracker: ValueTracker, keys: Sequence[str], remember: Dict[int, Any], rows: Sequence[int]) -> None:
    """Store each prompt's current row and its post-update log-probs for the next visit (exact mode)."""
    for key, r in zip(keys, rows):
        ids, logp, mask = remember[r]
        tracker.remember([key], logp.unsqueeze(0), mask.unsqueeze(0), rows={"input_ids": ids.unsqueeze(0)})


def step_drift(abs_logratio_per_update: Sequence[float]) -> float:
    """One step's policy drift for accumulated ρ, from what the PPO update already measured.

    Mini-batch k (0-based) of the step's U updates is scored after k updates of this step, so its
    mean |logπ_θ − logπ_old| ≈ k·d with d the drift of one update (assuming drift adds up linearly
    within a step). The least-squares fit through the origin is d = Σ k·m_k / Σ k², and the step's
    drift is U·d. The first
    mini-batch measures nothing (ratio 1), hence U ≥ 2 is required (checked at start-up).
    """
    u = len(abs_logratio_per_update)
    if u < 2:
        raise ValueError("accumulated rho needs train.updates_per_step >= 2 (the first update measures no drift)")
    d = sum(k * m for k, m in enumerate(abs_logratio_per_update)) / sum(k * k for k in range(u))
    return u * d
