"""The SPO multi-turn ``<code>`` tool protocol (docs/algorithms.md §1.11, docs/engine_contracts.md §5).

One trajectory, token-in/token-out:

1. The prompt is one user message, ``SPO_TOOL_INSTRUCTION + problem`` (the recipe's exact string),
   rendered through the tokenizer's chat template with ``add_generation_prompt=True``.
2. Each assistant turn is one engine call on ``prompt_ids + response_ids`` with the stop string
   ``"</code>"`` (kept in the output). The generated ids are appended as returned (loss mask 1,
   their rollout log-probs); they are decoded only to look for code, never re-tokenised.
3. ``<code>(.*?)</code>`` is searched in the latest turn's text; the first block (only) has its
   markdown fences stripped and its last line print-wrapped, then runs on the :class:`CodeTool`.
4. The tool text (an exception or timeout gives ``"Error when executing tool: {e}"``) is cut in the
   middle to ``tool_response_max_chars``, wrapped ``<interpreter>\\n{text}\\n</interpreter>\\n\\n``,
   tokenised raw (``encode(text, add_special_tokens=False)``) and appended with loss mask 0 and
   log-prob 0.0. Generation then continues in the same assistant message.
5. Termination (checked in the recipe's order): response length (model + tool tokens) reaches the
   budget; assistant turns >= max; tool turns >= max; the turn has no code block; appending the
   tool output would reach the budget (then it is not appended).

Differences from the recipe, on purpose: each turn asks for at most ``budget - response length``
new tokens (so the budget is never overrun and nothing is cut afterwards), and a turn interrupted by
a weight update (finish_reason "abort") is resumed or restarted (``AgentLoopConfig.on_abort``).
"""

from __future__ import annotations

import asyncio
import re
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

from megatron_spo.rollout.code_tool import CodeTool, interpreter_block, truncate_middle, wrap_last_line_print
from megatron_spo.rollout.engine import Engine, EngineError, SamplingParams
from megatron_spo.rollout.sample import RolloutRequest, Sample

# The user-prompt prefix of the SPO recipe (spo_tool_agent_loop.py::_handle_pending_state), verbatim.
SPO_TOOL_INSTRUCTION = (
    "Solve the following problem step by step. You now have the ability to selectively write executable "
    "Python code to enhance your reasoning process. The Python code will be executed by an external "
    "sandbox, and the output (wrapped in `<interpreter>output_str</interpreter>`) can be returned to aid "
    "your reasoning and help you arrive at the final answer. The Python code should be complete scripts, "
    "including necessary imports. Important: The sandbox is stateless and non-interactive; thus, prior "
    "imports, definitions, and state do not persist between executions and cannot be referenced.\n"
    "Each code snippet is wrapped with `<code>\n```python\ncode snippet\n```\n</code>`.\n"
    "*user question:*\n"
)
# The suffix the recipe's dataset adds to every problem (spo_retool.py ``answer_format``).
ANSWER_FORMAT = "\nThe answer format must be: \\boxed{'The final answer goes here.'}"
CODE_BLOCK = re.compile(r"<code>(.*?)</code>", re.DOTALL)
CODE_STOP = "</code>"


@dataclass
class AgentLoopConfig:
    """Limits and sampling of one multi-turn rollout (SPO defaults).

    Attributes:
        max_response_len: token budget of the whole response, model and tool tokens (8192).
        max_prompt_len: a longer prompt fails the sample (per-sample error) instead of reaching the engine.
        context_len: model context; each turn asks for at most ``context_len - current length`` tokens,
            and a prompt that leaves no room fails the sample.
        tool_timeout_s: seconds a tool call may take; then its text is the timeout error.
        engine_timeout_s: seconds one engine call may take; then ``EngineError`` (the scheduler retries).
        on_abort: "resume" keeps the aborted partial tokens (and their log-probs and weight version)
            and continues from them; "restart" drops them and regenerates the turn.
        max_aborts: aborts tolerated per turn before ``EngineError``.
        add_answer_format: append ``ANSWER_FORMAT`` to the problem unless it already ends with it.
        seed: when set, every engine call gets its own sampling seed derived from (seed, sample uid,
            tokens so far), so a sample's tokens do not depend on how the engine batched requests or
            on what ran before: reruns and resumed runs reproduce the same rollouts.
    """

    max_response_len: int = 8192
    max_assistant_turns: int = 8
    max_user_turns: int = 8
    tool_response_max_chars: int = 256
    max_prompt_len: Optional[int] = None
    context_len: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    tool_timeout_s: float = 60.0
    engine_timeout_s: Optional[float] = 600.0
    on_abort: str = "resume"
    max_aborts: int = 8
    add_answer_format: bool = True
    seed: Optional[int] = None
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.on_abort not in ("resume", "restart"):
            raise ValueError(f"AgentLoopConfig.on_abort must be 'resume' or 'restart', got {self.on_abort!r}")
        for name in ("max_response_len", "max_assistant_turns", "max_user_turns", "tool_response_max_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AgentLoopConfig.{name} must be > 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# Pieces shared with the Hermes loop.


def render_prompt_ids(tokenizer, messages: List[Dict[str, Any]], **template_kwargs) -> List[int]:
    """Chat-template ``messages`` with the generation prompt and tokenise the text raw."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def check_prompt(sample: Sample, cfg: AgentLoopConfig) -> bool:
    """Fail ``sample`` (and return False) when its prompt is too long for ``cfg``."""
    n = len(sample.prompt_ids)
    if n == 0:
        sample.fail(f"sample {sample.uid}: empty prompt")
        return False
    if cfg.max_prompt_len is not None and n > cfg.max_prompt_len:
        sample.fail(f"sample {sample.uid}: prompt has {n} tokens > max_prompt_len {cfg.max_prompt_len}")
        return False
    if cfg.context_len is not None and n >= cfg.context_len:
        sample.fail(f"sample {sample.uid}: prompt has {n} tokens, no room left in context_len {cfg.context_len}")
        return False
    return True


def room_for_turn(sample: Sample, cfg: AgentLoopConfig) -> int:
    """New tokens the next turn may ask for: what is left of the budget and of the context."""
    room = cfg.max_response_len - len(sample.response_ids)
    if cfg.context_len is not None:
        room = min(room, cfg.context_len - len(sample.prompt_ids) - len(sample.response_ids))
    return room


def start_sample(request: RolloutRequest, group_index: int, prompt_ids: List[int]) -> Sample:
    """The empty trajectory of replica ``group_index`` of ``request``."""
    sample = Sample(uid=f"{request.uid}/{group_index}", request_uid=request.uid, group_index=group_index,
                    key=request.key, ground_truth=request.ground_truth, meta=dict(request.meta))
    sample.prompt_ids = list(prompt_ids)
    return sample


async def model_turn(engine: Engine, sample: Sample, cfg: AgentLoopConfig,
                     sampling: Callable[[int], SamplingParams]) -> Optional[Tuple[List[int], str]]:
    """Generate the next assistant turn into ``sample`` (tokens, log-probs, turn count).

    Returns ``(turn ids, engine finish reason)``, or None when the budget leaves no room for a turn
    (``sample.finish_reason`` is then "length"). ``sampling(room)`` builds the turn's settings.
    """
    room = room_for_turn(sample, cfg)
    if room <= 0:
        sample.finish_reason = "length"
        return None
    ids, lps, finish_reason = await generate_turn(
        engine, sample.prompt_ids + sample.response_ids, sampling(room), sample, cfg)
    sample.append_model_tokens(ids, lps)
    sample.assistant_turns += 1
    return ids, finish_reason


def turn_limit_reached(sample: Sample, cfg: AgentLoopConfig, engine_finish: str) -> bool:
    """After a model turn: set ``finish_reason`` and return True if the token budget or a turn limit ends
    the trajectory (checked in the reference's order: length, assistant turns, user turns)."""
    if engine_finish == "length" or len(sample.response_ids) >= cfg.max_response_len:
        sample.finish_reason = "length"
    elif sample.assistant_turns >= cfg.max_assistant_turns:
        sample.finish_reason = "max_assistant_turns"
    elif sample.user_turns >= cfg.max_user_turns:
        sample.finish_reason = "max_user_turns"
    else:
        return False
    return True


def call_seed(seed: int, uid: str, position: int) -> int:
    """A 31-bit sampling seed for one engine call of sample ``uid`` starting at token ``position``."""
    return zlib.crc32(f"{seed}|{uid}|{position}".encode()) & 0x7FFFFFFF


async def generate_turn(engine: Engine, ids: List[int], sampling: SamplingParams, sample: Sample,
                        cfg: AgentLoopConfig) -> Tuple[List[int], List[float], str]:
    """One assistant turn: ids, log-probs and engine finish reason ("stop" or "length").

    An "abort" (weight update mid-generation) is resumed or restarted per ``cfg.on_abort``. Each
    engine call appends one weight version to ``sample.weight_versions``: the smaller of the
    engine's version when the call was sent and the version it reports, so tokens sampled across an
    update are tagged with the older weights (what the staleness bound must see).

    Resume keeps the partial tokens with the log-probs of the weights that sampled them (the
    trainer's importance ratio then sees the true behaviour policy) and asks for the rest with
    ``prompt + partial`` as the new prompt. A stop string split across the abort point would not be
    seen by the engine (it only matches new text); single-token stops such as ``</code>`` here and
    eos are unaffected.

    Raises:
        EngineError: the engine failed, timed out (``cfg.engine_timeout_s``) or aborted more than
            ``cfg.max_aborts`` times.
    """
    turn_ids: List[int] = []
    turn_lp: List[float] = []
    aborts = 0
    while True:
        params = replace(sampling, max_new_tokens=sampling.max_new_tokens - len(turn_ids))
        if cfg.seed is not None:
            params = replace(params, seed=call_seed(cfg.seed, sample.uid, len(ids) + len(turn_ids)))
        start_version = _version_of(engine)
        try:
            res = await asyncio.wait_for(engine.agenerate(ids + turn_ids, params), cfg.engine_timeout_s)
        except asyncio.TimeoutError:
            raise EngineError(
                f"engine {getattr(engine, 'name', '?')} did not answer within {cfg.engine_timeout_s}s "
                f"(sample {sample.uid})") from None
        version = res.weight_version if start_version is None else min(start_version, res.weight_version)
        sample.weight_versions.append(int(version))
        if res.finish_reason != "abort":
            return turn_ids + list(res.token_ids), turn_lp + [float(x) for x in res.logprobs], res.finish_reason
        aborts += 1
        sample.count("aborts")
        if aborts > cfg.max_aborts:
            raise EngineError(f"sample {sample.uid}: generation aborted {aborts} times in one turn")
        if cfg.on_abort == "resume":
            turn_ids += list(res.token_ids)
            turn_lp += [float(x) for x in res.logprobs]
            if len(turn_ids) >= sampling.max_new_tokens:
                return turn_ids, turn_lp, "length"
        else:  # restart: drop the partial tokens and their version tag
            sample.weight_versions.pop()


def _version_of(engine: Engine) -> Optional[int]:
    try:
        return int(engine.weight_version)
    except Exception:  # a client without a cached version: rely on what the result reports
        return None


async def call_tool(fn: Callable[[], Awaitable[str]], timeout_s: float, sample: Sample) -> str:
    """Run one tool call; an exception or a timeout becomes "Error when executing tool: {e}" (counted)."""
    sample.count("tool_calls")
    try:
        text = await asyncio.wait_for(fn(), timeout_s)
        if not isinstance(text, str):
            raise TypeError(f"tool returned {type(text).__name__}, expected str")
        return text
    except asyncio.TimeoutError:
        err: BaseException = TimeoutError(f"tool call timed out after {timeout_s}s")
    except Exception as e:  # any tool failure is model-visible text, never a dead rollout
        err = e
    sample.count("tool_errors")
    sample.errors.append(f"tool: {type(err).__name__}: {err}")
    return f"Error when executing tool: {err}"


def finish(sample: Sample, tokenizer) -> Sample:
    sample.response_text = tokenizer.decode(sample.response_ids, skip_special_tokens=False)
    sample.check()
    return sample


def strip_code_fences(block: str) -> str:
    """Remove a leading ```lang line and a trailing ``` line from a ``<code>`` block, then strip."""
    code = block.strip()
    if code.startswith("```"):
        code = "\n".join(code.split("\n")[1:])
    if code.endswith("```"):
        lines = code.split("\n")
        if lines[-1].strip() == "```":
            code = "\n".join(lines[:-1])
    return code.strip()


# ---------------------------------------------------------------------------------------------


def spo_user_prompt(problem: str, add_answer_format: bool = True) -> str:
    """The SPO first-turn user message for ``problem``."""
    if add_answer_format and not problem.endswith(ANSWER_FORMAT):
        problem = problem + ANSWER_FORMAT
    return SPO_TOOL_INSTRUCTION + problem


class SPOCodeAgentLoop:
    """Runs the SPO ``<code>`` protocol for one request (see the module docstring).

    Args:
        tokenizer: HF tokenizer with a chat template (``make_tiny_tokenizer()`` in tests).
        tool: the code tool; the loop print-wraps the code before ``tool.run``.
        config: limits and sampling.
    """

    def __init__(self, tokenizer, tool: CodeTool, config: Optional[AgentLoopConfig] = None):
        self.tokenizer = tokenizer
        self.tool = tool
        self.cfg = config or AgentLoopConfig()

    def prompt_ids(self, request: RolloutRequest) -> List[int]:
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        users = [m for m in request.messages or [] if m.get("role") == "user"]
        if not users:
            raise ValueError(f"request {request.uid}: no user message to take the problem from")
        text = spo_user_prompt(str(users[0]["content"]), self.cfg.add_answer_format)
        return render_prompt_ids(self.tokenizer, [{"role": "user", "content": text}], **self.cfg.chat_template_kwargs)

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                              top_k=self.cfg.top_k, stop=(CODE_STOP,))

    async def run(self, engine: Engine, request: RolloutRequest, group_index: int = 0) -> Sample:
        """Roll out ``request`` on ``engine``; returns the sample (``finish_reason`` "error" on bad input).

        Raises:
            EngineError: engine failures (the scheduler retries or reports them per sample).
        """
        cfg = self.cfg
        sample = start_sample(request, group_index, self.prompt_ids(request))
        if not check_prompt(sample, cfg):
            return sample
        # model_turn returns None when the budget leaves no room for another turn.
        while (turn := await model_turn(engine, sample, cfg, self.sampling)) is not None:
            ids, engine_finish = turn
            if turn_limit_reached(sample, cfg, engine_finish):
                break
            blocks = CODE_BLOCK.findall(self.tokenizer.decode(ids, skip_special_tokens=False))
            if not blocks:
                sample.finish_reason = "stop"
                break
            code = wrap_last_line_print(strip_code_fences(blocks[0]))
            text = await call_tool(lambda: self.tool.run(code), cfg.tool_timeout_s, sample)
            tool_ids = self.tokenizer.encode(interpreter_block(truncate_middle(text, cfg.tool_response_max_chars)),
                                             add_special_tokens=False)
            if len(sample.response_ids) + len(tool_ids) >= cfg.max_response_len:
                sample.finish_reason = "tool_overflow"
                break
            sample.append_context_tokens(tool_ids)
            sample.user_turns += 1
        return finish(sample, self.tokenizer)
