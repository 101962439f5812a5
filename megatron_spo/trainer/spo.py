"""The SPO family's step: prioritized draw, one response per prompt, r − v̂ advantages, ρ and the tracker.

Everything Single-stream Policy Optimization does in a training step is here (docs/algorithms.md §1):

- **draw**: a candidate pool of ``algo.spo.pool_size`` prompts from the shuffled stream, then the
  prioritized sampler's pick of ``train.prompts_per_step`` from it (docs/algorithms.md §1.4); the tracker's v̂ of each
  picked prompt is read now, before this step's update, and travels with the draw (§1.5).
- **rollout**: one response per prompt, delivered one at a time (no groups).
- **advantages**: ``spo_advantages(r, v̂)`` over the whole batch (global normalisation), the same
  value on every trained token of a response.
- **after the update** (docs/algorithms.md §1.7, §1.8): ρ with the updated policy — exact (re-score each prompt's stored
  row from its previous visit) or accumulated (the drift ledger) — then α ← ρα + r, β ← ρβ + (1 − r)
  for the samples that finished without error.
- **state**: the sampler and the tracker.

Every rank keeps an identical tracker and sampler: they start from the same prior and seed, and each
update is applied on every rank from data every rank holds (rewards of the whole batch, and ρ inputs
all-gathered from the data-parallel shards). So any rank's ``state_dict`` is the run's.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence, Tuple

import torch

from megatron_spo.algos.spo_advantage import spo_advantages
from megatron_spo.algos.spo_sampler import PrioritizedSampler
from megatron_spo.algos.spo_tracker import ValueTracker
from megatron_spo.config import Config, ConfigError
from megatron_spo.data import PromptDataset
from megatron_spo.rollout.sample import Sample
from megatron_spo.trainer import collectives
from megatron_spo.trainer.algorithm import AlgorithmStep, Draw, UpdateOutcome, sequence_to_tokens
from megatron_spo.trainer.offline_values import load_scores
from megatron_spo.trainer.prompt_stream import PromptStream
from megatron_spo.trainer.train_batch import ok_mask, rewards_of

log = logging.getLogger(__name__)


class SPOStep(AlgorithmStep):
    """SPO (``algo.advantage=spo``)."""

    names = ("spo",)

    def __init__(self, cfg: Config, dataset: PromptDataset, stream: PromptStream) -> None:
        super().__init__(cfg, dataset, stream)
        self.tracker = build_tracker(cfg, dataset.keys())
        s = cfg.algo.spo
        self.sampler = PrioritizedSampler(self.tracker, eps=s.sampling_eps, thompson=s.thompson, seed=cfg.train.seed)

    @classmethod
    def samples_per_prompt(cls, cfg: Config) -> int:
        return 1

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.algo.spo.rho_mode == "accumulated" and cfg.train.updates_per_step < 2:
            raise ConfigError("algo.spo.rho_mode=accumulated needs train.updates_per_step >= 2")

    def draw(self, metrics: Dict[str, float]) -> Draw:
        cfg = self.cfg
        pool = self.stream.take(min(cfg.algo.spo.pool_size, len(self.dataset)))
        keys = [self.dataset[i].key for i in pool]
        picked = self.sampler.sample(keys, cfg.train.prompts_per_step).tolist()
        probs = self.sampler.probabilities(keys)
        baselines = self.tracker.values([keys[i] for i in picked])
        metrics.update({"sampler/pool_size": float(len(pool)),
                        "sampler/pool_sampleable": float((probs > 0).sum()),
                        "sampler/picked_prob_mass": float(probs[picked].sum()),
                        "sampler/picked_value_mean": float(baselines.mean())})
        return Draw([self.dataset[pool[i]] for i in picked], 1, "single_stream", baselines=baselines)

    def advantages(self, draw: Draw, samples: List[Sample], batch: Dict[str, torch.Tensor],
                   metrics: Dict[str, float]) -> torch.Tensor:
        baseline = draw.baseline_of(samples)
        metrics["spo/baseline_mean"] = float(baseline.mean())
        rewards, ok = rewards_of(samples), ok_mask(samples)
        seq = torch.zeros_like(rewards)
        if bool(ok.any()):
            r = rewards[ok]
            one = torch.ones(int(ok.sum()), 1)  # a one-token mask: the estimator broadcasts to it
            seq[ok] = spo_advantages(r, baseline[ok].to(r.dtype), one)[:, 0].to(seq.dtype)
        return sequence_to_tokens(seq, batch["loss_mask"])

    def after_update(self, actor: Any, outcome: UpdateOutcome, metrics: Dict[str, float]) -> None:
        """ρ with the updated policy, then the tracker update for the samples without error."""
        t, samples, rows = self.tracker, outcome.samples, outcome.rows
        keys = [s.key for s in samples]
        exact = t.rho_type == "kl" and t.rho_mode == "exact"
        if exact:
            now, remember = exact_rho_inputs(actor, t, [keys[r] for r in rows], rows, outcome.local, outcome.pad_id)
            now, remember = collectives.gather_rows(now), collectives.gather_rows(remember)
        elif t.rho_mode == "accumulated":
            t.record_step_drift(step_drift(outcome.abs_logratio))
        ok = ok_mask(samples)
        good = [i for i in range(len(samples)) if bool(ok[i])]
        if not good:
            return
        gkeys = [keys[i] for i in good]
        rho = t.rho(gkeys, [now[r] for r in good]) if exact else t.rho(gkeys)
        t.update(gkeys, rewards_of(samples)[good], rho)
        if exact:
            remember_rows(t, gkeys, remember, good)
        metrics.update({k: float(v) for k, v in t.metrics().items()})

    def state_dict(self) -> Dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.tracker.load_state_dict(state["tracker"])


def build_tracker(cfg: Config, dataset_keys: Sequence[str]) -> ValueTracker:
    """The value tracker of ``algo.spo``: an offline prior where given, else Beta(½, ½) for every prompt.

    With an offline file, prompts missing from it are not tracked and get sampling weight 0
    (docs/algorithms.md §1.3); a file whose keys match no dataset prompt is an error (the keys were
    built differently).
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


def _stored_batch(stored: Sequence[Dict[str, torch.Tensor]], pad_id: int) -> Dict[str, torch.Tensor]:
    width = max(int(s["input_ids"].shape[0]) for s in stored)
    ids = torch.full((len(stored), width), int(pad_id), dtype=torch.long)
    for i, s in enumerate(stored):
        ids[i, : s["input_ids"].shape[0]] = s["input_ids"]
    lengths = torch.tensor([int(s["input_ids"].shape[0]) for s in stored], dtype=torch.long)
    return {"input_ids": ids, "lengths": lengths, "loss_mask": torch.zeros(ids.shape, dtype=torch.float32)}


def exact_rho_inputs(actor, tracker: ValueTracker, keys: Sequence[str], rows: Sequence[int],
                     batch: Dict[str, torch.Tensor], pad_id: int) -> Tuple[Dict[int, Any], Dict[int, Any]]:
    """This rank's share of the exact-ρ work (docs/algorithms.md §1.7), after the step's policy update.

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
    drift is U·d. The first mini-batch measures nothing (ratio 1), hence U ≥ 2 is required (checked
    at start-up by :meth:`SPOStep.check_config`).
    """
    u = len(abs_logratio_per_update)
    if u < 2:
        raise ValueError("accumulated rho needs train.updates_per_step >= 2 (the first update measures no drift)")
    d = sum(k * m for k, m in enumerate(abs_logratio_per_update)) / sum(k * k for k in range(u))
    return u * d
