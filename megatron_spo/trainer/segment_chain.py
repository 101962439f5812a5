"""The SPO-chain family's step: segment advantages from Monte-Carlo continuations (docs/algorithms.md §2.1).

Segment Policy Optimization, chain form (``algo.advantage=spo_chain``), in one training step:

- **draw**: the next ``train.prompts_per_step`` prompts of the shuffled stream (uniform), one
  response each, delivered one at a time.
- **rollout** (rank 0): the responses from the rollout phase; then, per response, the cut points
  (tokens whose sampled probability ``p = exp(rollout log-prob)`` is below
  ``algo.segment.prob_threshold``, every ``algo.segment.cutpoint_interval``-th of them, the cut
  being the state just before the token); the prefix queries ``prompt ids + response ids[0..c]``
  (token ids, de-duplicated over the batch); ``algo.segment.mc_rollouts`` continuations per prefix
  on the engine, with the agent loop's sampling settings, from that exact token prefix, rewarded by
  the phase's reward. ``V(prefix)`` is their mean reward; the response's final value is its own
  reward. Each sample carries its cuts and values in ``sample.meta`` (``SEGMENT_CUTS``,
  ``SEGMENT_VALUES``), so every rank has them after the broadcast.
- **advantages**: each token gets the value difference of its segment
  (:func:`~megatron_spo.algos.segment_chain.chain_segment_advantages`); the probability mask zeroes
  tokens with ``p >= prob_threshold`` and narrows ``batch["loss_mask"]`` in place to the others (only
  low-probability tokens are trained); whitening over those tokens
  (:func:`~megatron_spo.algos.segment_chain.whiten_segment_advantages`).
- **after the update**: nothing; **state**: none beyond the loop's prompt stream (continuations are
  seeded per sample uid, so a resumed run regenerates the same ones).

Only the single-turn agent is supported (:meth:`SegmentChainStep.check_config` refuses the tool
loops: cut points on tool tokens and continuations that run the tool are not implemented).

Deviations from the reference, on purpose:

1. **p comes from the engine.** The reference scores each response with the trainer to get p; here
   the engine's log-prob of each sampled token (after temperature, like the trainer's) is used, for
   the cut points, the probability mask and the whitening statistics: this loop computes the
   trainer's old log-probs only after the advantages. ``mismatch/token_kl`` shows the difference.
2. **One response per drawn prompt** (the reference: 8 per question). A response's advantage uses
   only its own continuations, so this only changes which prompts a step repeats; raise
   ``train.prompts_per_step`` for more responses per step.
3. **Continuations** get the response's whole token budget (``rollout.max_response_len`` counted
   from the response start) and the phase's reward; a length-truncated one is scored like a
   truncated response (the reference's "unfinished" 0 holds for rewards that give 0 to an unfinished
   answer). A failed continuation is left out of its prefix's mean; a prefix whose every
   continuation failed loses its cut (its segment joins the next one), counted in
   ``segment/continuation_errors``.
4. **Nothing below the threshold.** When no trained token of the whole batch has ``p < threshold``
   the loss mask is kept and every advantage is 0 (the reference's whitening fallback gives the same
   zeros), so the update has tokens to normalise by. A row with no such token (others having some)
   keeps its first trained token in the loss with advantage 0, so no mini-batch or micro-batch is
   left without a token to normalise by (the actor refuses a zero normaliser).
5. The first-segment rule of the reference is kept: without a cut at −1 (first response token of
   low probability) there is no V(prompt), and the first segment gets advantage 0 (before whitening).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

import torch

from megatron_spo.algos.segment_chain import (
    build_prefix_queries, chain_cutpoints, chain_segment_advantages, keep_a_token_per_row, probability_mask,
    whiten_segment_advantages,
)
from megatron_spo.config import Config, ConfigError
from megatron_spo.rollout.agent_loop import finish, model_turn, start_sample
from megatron_spo.rollout.engine import Engine
from megatron_spo.rollout.sample import RolloutRequest, Sample
from megatron_spo.rollout.scheduler import RolloutScheduler, SchedulerConfig
from megatron_spo.trainer.algorithm import AlgorithmStep, Draw
from megatron_spo.trainer.train_batch import ok_mask

if TYPE_CHECKING:
    from megatron_spo.rollout.phase import RolloutBatch, RolloutPhase

# sample.meta keys: the response's kept cut positions (0-based into the response, −1 = the prompt
# state) and the Monte-Carlo value of each cut's prefix.
SEGMENT_CUTS = "segment_cuts"
SEGMENT_VALUES = "segment_values"
# request.meta key of a continuation: the response prefix (ids, rollout log-probs) it starts from.
_PREFIX = "segment_prefix"


def token_probs(logprobs: torch.Tensor) -> torch.Tensor:
    """``p = exp(log-prob)``, any shape; clamped to 1 so a log-prob rounded just above 0 stays a probability."""
    return logprobs.to(torch.float32).exp().clamp(max=1.0)


class SegmentChainStep(AlgorithmStep):
    """SPO-chain (``algo.advantage=spo_chain``); see the module docstring."""

    names = ("spo_chain",)

    @classmethod
    def samples_per_prompt(cls, cfg: Config) -> int:
        return 1

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.rollout.agent != "single_turn":
            raise ConfigError(
                f"algo.advantage=spo_chain supports only rollout.agent=single_turn, got rollout.agent="
                f"{cfg.rollout.agent!r}: cut points on tool tokens and continuations that run the tool are not "
                "implemented")

    def draw(self, metrics: Dict[str, float]) -> Draw:
        records = [self.dataset[i] for i in self.stream.take(self.cfg.train.prompts_per_step)]
        return Draw(records, 1, "single_stream")

    # ---- rollout: responses, then continuations from every cut's prefix -------------------------

    def rollout(self, phase: "RolloutPhase", draw: Draw, uid_prefix: str) -> "RolloutBatch":
        batch = super().rollout(phase, draw, uid_prefix)
        seg = self.cfg.algo.segment
        start = time.monotonic()
        samples = batch.samples
        ok = [s for s in samples if s.ok]
        cuts = [chain_cutpoints(token_probs(torch.tensor(s.rollout_logprobs, dtype=torch.float32)),
                                torch.tensor(s.loss_mask, dtype=torch.bool), seg.prob_threshold,
                                seg.cutpoint_interval).tolist() for s in ok]
        queries = build_prefix_queries([s.prompt_ids for s in ok], [s.response_ids for s in ok], cuts)
        owner = {}  # query -> (sample, cut) of its first owner: the prompt split and log-probs to continue from
        for s, row, c in zip(ok, queries.owners, cuts):
            for q, cut in zip(row, c):
                owner.setdefault(q, (s, cut))
        requests = [continuation_request(f"{uid_prefix}seg{q}", *owner[q], seg.mc_rollouts)
                    for q in range(len(queries.queries))]
        continuations = _run_on(phase, self._continuations(phase, requests)) if requests else []
        values, errors, tokens = prefix_values(requests, continuations)
        kept_cuts = 0
        segments = 0
        for s, row, c in zip(ok, queries.owners, cuts):
            pairs = [(cut, values[q]) for q, cut in zip(row, c) if not math.isnan(values[q])]
            s.meta[SEGMENT_CUTS] = [cut for cut, _ in pairs]
            s.meta[SEGMENT_VALUES] = [v for _, v in pairs]
            kept_cuts += len(pairs)
            segments += 1 + sum(cut >= 0 for cut, _ in pairs)  # a cut at −1 values the prompt; it splits nothing
        batch.metrics.update({
            "segment/cutpoints_per_response": kept_cuts / len(ok) if ok else 0.0,
            "segment/segments": float(segments),
            "segment/prefix_queries": float(len(requests)),
            "segment/continuations": float(len(continuations)),
            "segment/continuation_errors": float(errors),
            "segment/continuation_tokens": float(tokens),
            "segment/seconds": time.monotonic() - start,
        })
        return batch

    async def _continuations(self, phase: "RolloutPhase", requests: List[RolloutRequest]) -> List[Sample]:
        """Every continuation of ``requests``, scheduled with the phase's concurrency, retries and reward."""
        loop = phase.loop

        async def continue_prefix(engine: Engine, request: RolloutRequest, index: int) -> Sample:
            sample = start_sample(request, index, list(request.prompt_ids or []))
            ids, logprobs = request.meta[_PREFIX]
            sample.append_model_tokens(list(ids), list(logprobs))
            turn = await model_turn(engine, sample, loop.cfg, loop.sampling)
            if turn is not None:  # None: no room left, model_turn set "length"
                sample.finish_reason = "length" if turn[1] == "length" else "stop"
            return finish(sample, loop.tokenizer)

        sched = RolloutScheduler(
            phase.engine, continue_prefix,
            SchedulerConfig(max_concurrency=phase.cfg.max_concurrency, max_retries=phase.max_retries),
            reward_fn=phase.reward)
        for req in requests:
            sched.submit(req)
        try:
            return list(await sched.get_batch(sum(r.n for r in requests)))
        finally:
            await sched.aclose()

    # ---- advantages -----------------------------------------------------------------------------

    def advantages(self, draw: Draw, samples: List[Sample], batch: Dict[str, torch.Tensor],
                   metrics: Dict[str, float]) -> torch.Tensor:
        """``[B, T]`` whitened segment advantages; narrows ``batch["loss_mask"]`` to tokens with p < threshold."""
        threshold = self.cfg.algo.segment.prob_threshold
        loss_mask = batch["loss_mask"]
        probs = token_probs(batch["rollout_logp"])
        low = probability_mask(probs, threshold, loss_mask)
        kept = int(low.sum())
        metrics["segment/tokens_trained"] = float(kept)
        metrics["segment/tokens_masked"] = float(int(loss_mask.sum()) - kept)
        if kept == 0:  # nothing below the threshold: zeros, loss mask kept (module docstring item 4)
            metrics["segment/tokens_masked"] = 0.0
            return torch.zeros_like(loss_mask, dtype=torch.float32)
        raw = segment_table(samples, tuple(loss_mask.shape))
        adv = whiten_segment_advantages(raw * low, loss_mask, probs, threshold=threshold)
        loss_mask.copy_(keep_a_token_per_row(loss_mask, low.to(loss_mask.dtype)))  # docstring item 4
        return adv.to(torch.float32)

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def continuation_request(uid: str, sample: Sample, cut: int, n: int) -> RolloutRequest:
    """``n`` continuations of ``sample`` from the state after response token ``cut`` (−1: the prompt)."""
    prefix = (list(sample.response_ids[:cut + 1]), list(sample.rollout_logprobs[:cut + 1]))
    return RolloutRequest(uid=uid, prompt_ids=list(sample.prompt_ids), ground_truth=sample.ground_truth,
                          key=sample.key, n=n, meta={**sample.meta, _PREFIX: prefix})


def prefix_values(requests: Sequence[RolloutRequest],
                  continuations: Sequence[Sample]) -> Tuple[List[float], int, int]:
    """Per request: the mean reward of its continuations that did not fail (NaN when all failed).

    Returns ``(values [Q], failed continuations, generated tokens)``; a continuation's generated
    tokens are its response tokens past the prefix it started from.
    """
    index = {r.uid: q for q, r in enumerate(requests)}
    rewards: List[List[float]] = [[] for _ in requests]
    errors = tokens = 0
    for c in continuations:
        q = index[c.request_uid]
        if not c.ok:
            errors += 1
            continue
        rewards[q].append(float(c.reward or 0.0))
        tokens += sum(c.loss_mask) - len(requests[q].meta[_PREFIX][0])
    values = [sum(r) / len(r) if r else float("nan") for r in rewards]
    return values, errors, tokens


def segment_table(samples: Sequence[Sample], shape: Tuple[int, int]) -> torch.Tensor:
    """``[B, T]`` float64 segment advantages in the batch layout (response of row i at its prompt's end).

    Rows of failed samples are 0. No probability mask, no whitening.
    """
    out = torch.zeros(shape, dtype=torch.float64)
    ok = ok_mask(samples)
    for i, s in enumerate(samples):
        if not bool(ok[i]) or not s.response_ids:
            continue
        if SEGMENT_CUTS not in s.meta:
            raise ValueError(f"sample {s.uid} has no segment values: spo_chain samples come from "
                             "SegmentChainStep.rollout")
        p, r = len(s.prompt_ids), len(s.response_ids)
        out[i, p:p + r] = chain_segment_advantages(r, s.meta[SEGMENT_CUTS], s.meta[SEGMENT_VALUES],
                                                   float(s.reward or 0.0), dtype=torch.float64)
    return out


def _run_on(phase: "RolloutPhase", coro) -> Any:
    """Run ``coro`` on the event loop the phase's last ``run`` used: HTTP engine clients keep a
    connection pool per event loop, so the continuations reuse the step's pools."""
    loop = getattr(phase, "_event_loop", None)
    if loop is None or loop.is_closed():
        return asyncio.run(coro)
    return loop.run_until_complete(coro)
