"""The rollout phase the trainer, ``eval`` and ``estimate-values`` share: prompts in, rewarded samples out.

One call rolls out ``n`` samples for each :class:`~megatron_spo.data.PromptRecord` on an engine (or
a fleet of them), through the per-sample asynchronous scheduler and the agent loop named by
``rollout.agent``:

- ``single_turn``: one generation from the chat-templated prompt, no tools (:class:`SingleTurnLoop`);
- ``spo_code``: the SPO ``<code>`` tool protocol (:class:`~megatron_spo.rollout.agent_loop.SPOCodeAgentLoop`);
- ``hermes``: Hermes ``<tool_call>`` JSON through the chat template (``code_interpreter`` tool).

Each sample gets its reward from a :class:`~megatron_spo.rollout.reward_registry.RewardManager` as it
finishes (in worker processes with a hard timeout for rewards named by the config; a timed-out reward
is 0 and counted in ``rollout/reward_timeouts``, a key logged only when there were some). A sample that
fails (engine error after retries, timeout, a broken reward) is counted and kept with
``finish_reason "error"`` / reward 0; it never ends the phase. A prompt longer than
``max_prompt_len`` tokens (or than the engine's context) is bad input: a :class:`DataError` naming
the row, or, with ``skip_bad_rows``, a counted and logged skip (``RolloutBatch.skipped``).

The trainer builds one :class:`RolloutPhase` and calls :meth:`RolloutPhase.run` once per step with
that step's prompts; the phase keeps one event loop across calls so HTTP clients keep their
connection pools. :func:`rollout` is the one-shot form.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from megatron_spo.config import RolloutConfig
from megatron_spo.data import DataError, PromptRecord
from megatron_spo.rollout.agent_loop import (
    AgentLoopConfig, SPOCodeAgentLoop, check_prompt, finish, model_turn, render_prompt_ids, start_sample,
)
from megatron_spo.rollout.engine import Engine, SamplingParams
from megatron_spo.rollout.reward_registry import RewardManager
from megatron_spo.rollout.sample import RolloutRequest, Sample
from megatron_spo.rollout.scheduler import RolloutScheduler, SchedulerConfig

log = logging.getLogger(__name__)

AGENTS = ("single_turn", "spo_code", "hermes")


@dataclass
class RolloutBatch:
    """What one rollout phase returns.

    Attributes:
        samples: ``len(records_kept) * n`` samples, ordered by record then replica index
            (``sample.meta["record"]`` is the record's position in the input list, ``["row"]`` its
            dataset row index).
        metrics: counters and rates, keys ``rollout/...`` (see :func:`batch_metrics`).
        skipped: dataset row index -> reason, for prompts skipped as bad input (``skip_bad_rows``).
    """

    samples: List[Sample]
    metrics: Dict[str, float]
    skipped: Dict[int, str] = field(default_factory=dict)

    def groups(self) -> List[List[Sample]]:
        """Samples grouped per record, in input order (the ``n`` replicas of each prompt)."""
        out: Dict[int, List[Sample]] = {}
        for s in self.samples:
            out.setdefault(s.meta["record"], []).append(s)
        return list(out.values())


class SingleTurnLoop:
    """One assistant turn from the chat-templated prompt, no tools (``rollout.agent=single_turn``).

    Generation stops at the tokenizer's eos token (kept in the response, as the engines do), at the
    token budget ``max_response_len`` or at the context end. Same interface as the tool loops.
    """

    def __init__(self, tokenizer, config: Optional[AgentLoopConfig] = None):
        self.tokenizer = tokenizer
        self.cfg = config or AgentLoopConfig()

    def prompt_ids(self, request: RolloutRequest) -> List[int]:
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        return render_prompt_ids(self.tokenizer, list(request.messages or []), **self.cfg.chat_template_kwargs)

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        eos = self.tokenizer.eos_token_id
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                              top_k=self.cfg.top_k, stop_token_ids=(eos,) if eos is not None else ())

    async def run(self, engine: Engine, request: RolloutRequest, group_index: int = 0) -> Sample:
        sample = start_sample(request, group_index, self.prompt_ids(request))
        if not check_prompt(sample, self.cfg):
            return sample
        turn = await model_turn(engine, sample, self.cfg, self.sampling)
        if turn is None:
            return sample.fail(f"sample {sample.uid}: no room left to generate (prompt {len(sample.prompt_ids)} tokens)")
        sample.finish_reason = "length" if turn[1] == "length" else "stop"
        return finish(sample, self.tokenizer)


def loop_config(cfg: RolloutConfig, *, max_prompt_len: Optional[int] = None,
                context_len: Optional[int] = None, seed: Optional[int] = None) -> AgentLoopConfig:
    """The agent-loop limits and sampling of ``cfg`` (``rollout.*``).

    ``context_len`` is the engine's context window in tokens (prompt + response), when known;
    ``seed`` makes every sample's sampling reproducible (see ``AgentLoopConfig.seed``).
    """
    return AgentLoopConfig(
        max_response_len=cfg.max_response_len, max_assistant_turns=cfg.max_assistant_turns,
        max_user_turns=cfg.max_user_turns, tool_response_max_chars=cfg.tool_response_max_chars,
        max_prompt_len=max_prompt_len, context_len=context_len, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, engine_timeout_s=cfg.request_timeout_s, seed=seed,
    )


def build_agent_loop(agent: str, tokenizer, loop_cfg: AgentLoopConfig, *, tool=None,
                     sandbox_url: str = "http://127.0.0.1:8080"):
    """The agent loop named ``agent``; tool loops use ``tool`` (a CodeTool) or a SandboxFusion client."""
    if agent == "single_turn":
        return SingleTurnLoop(tokenizer, loop_cfg)
    if agent not in AGENTS:
        raise ValueError(f"rollout.agent must be one of {AGENTS}, got {agent!r}")
    if tool is None:
        from megatron_spo.rollout.code_tool import SandboxFusionTool

        tool = SandboxFusionTool(sandbox_url)
    if agent == "spo_code":
        return SPOCodeAgentLoop(tokenizer, tool, loop_cfg)
    from megatron_spo.rollout.hermes_loop import CODE_INTERPRETER_SCHEMA, HermesToolAgentLoop, code_interpreter

    return HermesToolAgentLoop(tokenizer, {"code_interpreter": code_interpreter(tool)}, loop_cfg,
                               tool_schemas=[CODE_INTERPRETER_SCHEMA])


def as_reward_manager(reward: Any) -> RewardManager:
    """A :class:`RewardManager` from a manager, a registered name / ``module:function`` path, or a function."""
    return reward if isinstance(reward, RewardManager) else RewardManager(reward)


class RolloutPhase:
    """Rolls out prompt records on an engine with one agent loop and one reward (see the module doc).

    Args:
        engine: an :class:`~megatron_spo.rollout.engine.Engine` or a fleet behaving as one.
        tokenizer: the policy's HF tokenizer (chat template).
        cfg: ``rollout.*`` settings: agent, sampling (temperature / top_p / top_k), budget, turns,
            concurrency, timeouts, sandbox URL.
        reward: RewardManager, reward name / import path, or reward function.
        max_prompt_len: longest prompt in tokens (``data.max_prompt_len``); longer is bad input.
        skip_bad_rows: skip (count, log) over-long prompts instead of raising.
        context_len: engine context window in tokens, when known (prompts must leave room in it).
        tool: a CodeTool for the tool loops (default: SandboxFusion at ``cfg.sandbox_url``).
        max_retries: restarts of a sample after an engine error or timeout before it is reported failed.
        seed: per-sample sampling seeds (reproducible rollouts whatever the engine's batching).
    """

    def __init__(self, engine: Engine, tokenizer, cfg: RolloutConfig, *, reward: Any = "spo_strict_boxed",
                 max_prompt_len: Optional[int] = None, skip_bad_rows: bool = False,
                 context_len: Optional[int] = None, tool=None, max_retries: int = 2, seed: Optional[int] = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.reward = as_reward_manager(reward)
        self._own_reward = self.reward is not reward  # its worker processes are closed with the phase
        self.reward.prestart()  # a reward worker imports its module while the engine warms up
        self.max_prompt_len = max_prompt_len
        self.context_len = context_len
        self.skip_bad_rows = skip_bad_rows
        self.max_retries = max_retries
        if tool is None and cfg.agent != "single_turn":
            from megatron_spo.rollout.code_tool import SandboxFusionTool

            tool = self._own_tool = SandboxFusionTool(cfg.sandbox_url)  # closed with the phase
        else:
            self._own_tool = None
        self.loop = build_agent_loop(cfg.agent, tokenizer,
                                     loop_config(cfg, max_prompt_len=max_prompt_len, context_len=context_len,
                                                 seed=seed),
                                     tool=tool, sandbox_url=cfg.sandbox_url)
        self._event_loop: Optional[asyncio.AbstractEventLoop] = None
        self._calls = 0

    # -- prompts ------------------------------------------------------------------------------

    def prompt_ids(self, request: RolloutRequest) -> List[int]:
        """The exact prompt ids the agent loop will send for ``request``."""
        if hasattr(self.loop, "prompt_ids"):
            return self.loop.prompt_ids(request)
        # The Hermes loop renders the prompt with its tool schemas inside ``run``; render it the same way.
        return self.tokenizer.encode(self.loop._render([dict(m) for m in request.messages]), add_special_tokens=False)

    def prepare(self, records: Sequence[PromptRecord], n: int, uid_prefix: str = "",
                source: str = "") -> Tuple[List[RolloutRequest], Dict[int, str]]:
        """Requests for ``records`` (prompt ids rendered once, lengths checked) and the skipped rows.

        Raises:
            DataError: a prompt longer than ``max_prompt_len`` or leaving no room in the context,
                naming the row and the prompt key (unless ``skip_bad_rows``).
        """
        requests: List[RolloutRequest] = []
        skipped: Dict[int, str] = {}
        where = f"dataset {source!r} " if source else ""
        for pos, rec in enumerate(records):
            req = RolloutRequest(uid=f"{uid_prefix}{pos}", messages=[dict(m) for m in rec.messages],
                                 ground_truth=rec.answer, key=rec.key, n=n, meta={"record": pos, "row": rec.index})
            ids = self.prompt_ids(req)
            problem = None
            if self.max_prompt_len is not None and len(ids) > self.max_prompt_len:
                problem = f"prompt is {len(ids)} tokens, longer than data.max_prompt_len={self.max_prompt_len}"
            elif self.context_len is not None and len(ids) >= self.context_len:
                problem = f"prompt is {len(ids)} tokens, leaving no room in the engine's context of {self.context_len}"
            if problem is not None:
                message = f"{where}row {rec.index} (prompt {rec.key[:60]!r}): {problem}"
                if not self.skip_bad_rows:
                    raise DataError(message + "; set data.skip_bad_rows=true to skip such rows")
                skipped[rec.index] = message
                continue
            if self.cfg.agent != "hermes":  # the Hermes loop re-renders from the messages itself
                req.prompt_ids = ids
            requests.append(req)
        if skipped:
            log.warning("rollout: skipped %d over-long prompt(s) (first: %s)", len(skipped), next(iter(skipped.values())))
        return requests, skipped

    # -- running ------------------------------------------------------------------------------

    async def arun(self, records: Sequence[PromptRecord], n: int, *, mode: str = "single_stream",
                   uid_prefix: Optional[str] = None, source: str = "",
                   on_sample: Optional[Callable[[Sample], Any]] = None) -> RolloutBatch:
        """Async form of :meth:`run` (call from inside a running event loop)."""
        if n < 1:
            raise ValueError(f"rollout: n must be >= 1, got {n}")
        self._calls += 1
        prefix = f"c{self._calls}-" if uid_prefix is None else uid_prefix
        requests, skipped = self.prepare(records, n, prefix, source)
        reward_before = dict(self.reward.metrics)
        sched = RolloutScheduler(
            self.engine, self.loop.run,
            SchedulerConfig(mode=mode, max_concurrency=self.cfg.max_concurrency, max_retries=self.max_retries),
            reward_fn=self.reward)
        start = time.monotonic()
        for req in requests:
            sched.submit(req)
        total = len(requests) * n
        got: List[Sample] = []
        try:
            while len(got) < total:
                item = await sched.get()
                for s in item if isinstance(item, list) else [item]:
                    got.append(s)
                    if on_sample is not None:
                        on_sample(s)
        finally:
            await sched.aclose()
        seconds = time.monotonic() - start
        got.sort(key=lambda s: (s.meta["record"], s.group_index))
        metrics = batch_metrics(got, seconds)
        metrics["rollout/prompts"] = float(len(requests))
        metrics["rollout/skipped_prompts"] = float(len(skipped))
        metrics["rollout/reward_errors"] = float(self.reward.metrics["reward/errors"] - reward_before["reward/errors"])
        timeouts = (self.reward.metrics["reward/timeouts"] - reward_before["reward/timeouts"]
                    + sched.metrics.get("reward_timeouts", 0.0))
        if timeouts:  # only when there were some, so a run without any logs the keys it always logged
            metrics["rollout/reward_timeouts"] = float(timeouts)
        for name in ("retries", "timeouts", "engine_errors", "rollout_exceptions"):
            metrics[f"rollout/{name}"] = float(sched.metrics.get(name, 0.0))
        return RolloutBatch(got, metrics, skipped)

    def run(self, records: Sequence[PromptRecord], n: int, *, mode: str = "single_stream",
            uid_prefix: Optional[str] = None, source: str = "",
            on_sample: Optional[Callable[[Sample], Any]] = None) -> RolloutBatch:
        """Roll out ``n`` samples per record and return them with rewards set and the phase's metrics.

        Args:
            records: the prompts (e.g. the step's sampled prompts).
            n: samples per prompt (1 for SPO single-stream, the group size for GRPO, k for eval).
            mode: scheduler delivery, "single_stream" or "group" (the returned order is the same).
            uid_prefix: request uid prefix (default: unique per call).
            source: dataset name used in error messages.
            on_sample: called with each sample as it finishes (progress bars).
        """
        if self._event_loop is None or self._event_loop.is_closed():
            self._event_loop = asyncio.new_event_loop()
        return self._event_loop.run_until_complete(
            self.arun(records, n, mode=mode, uid_prefix=uid_prefix, source=source, on_sample=on_sample))

    def close(self) -> None:
        """Close the phase's event loop, the sandbox tool and the reward workers it created (not the engine:
        its owner closes it)."""
        if self._own_reward:
            self.reward.close()
        if self._event_loop is not None and not self._event_loop.is_closed():
            if self._own_tool is not None:  # its HTTP session lives on this event loop
                self._event_loop.run_until_complete(self._own_tool.aclose())
            self._event_loop.run_until_complete(self._event_loop.shutdown_asyncgens())
            self._event_loop.close()

    def __enter__(self) -> "RolloutPhase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batch_metrics(samples: Sequence[Sample], seconds: float) -> Dict[str, float]:
    """Phase metrics over ``samples`` taking ``seconds`` of wall time.

    ``tokens_generated`` counts model tokens (loss mask 1), not tool tokens; ``tokens_per_s`` is
    that over the phase's wall time; ``reward_mean`` is over samples that did not fail.
    """
    ok = [s for s in samples if s.ok]
    generated = sum(sum(s.loss_mask) for s in samples)
    out: Dict[str, float] = {
        "rollout/samples": float(len(samples)),
        "rollout/errors": float(len(samples) - len(ok)),
        "rollout/reward_mean": sum(float(s.reward or 0.0) for s in ok) / len(ok) if ok else 0.0,
        "rollout/tokens_generated": float(generated),
        "rollout/response_tokens": float(sum(len(s.response_ids) for s in samples)),
        "rollout/tokens_per_s": generated / seconds if seconds > 0 else 0.0,
        "rollout/seconds": float(seconds),
        "rollout/tool_calls": float(sum(s.metrics.get("tool_calls", 0) for s in samples)),
        "rollout/tool_errors": float(sum(s.metrics.get("tool_errors", 0) for s in samples)),
        "rollout/turns_mean": sum(s.num_turns for s in ok) / len(ok) if ok else 0.0,
        "rollout/assistant_turns_mean": sum(s.assistant_turns for s in ok) / len(ok) if ok else 0.0,
    }
    for reason, count in Counter(s.finish_reason for s in samples).items():
        out[f"rollout/finish/{reason}"] = float(count)
    return out


def rollout(records: Sequence[PromptRecord], n: int, *, engine: Engine, tokenizer, cfg: RolloutConfig,
            reward: Any = "spo_strict_boxed", mode: str = "single_stream", **phase_kwargs) -> RolloutBatch:
    """One-shot :meth:`RolloutPhase.run` (builds the phase, runs it once, closes its event loop)."""
    with RolloutPhase(engine, tokenizer, cfg, reward=reward, **phase_kwargs) as phase:
        return phase.run(records, n, mode=mode)


def with_sampling(cfg: RolloutConfig, *, temperature: Optional[float] = None, top_p: Optional[float] = None,
                  top_k: Optional[int] = None, max_response_len: Optional[int] = None) -> RolloutConfig:
    """A copy of ``cfg`` with the given sampling settings replaced (None keeps the value), validated."""
    changes = {k: v for k, v in dict(temperature=temperature, top_p=top_p, top_k=top_k,
                                     max_response_len=max_response_len).items() if v is not None}
    new = dataclasses.replace(cfg, **changes)
    new.check("rollout")
    return new
