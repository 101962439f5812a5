"""P1: rollout throughput, single-stream (SPO) vs group-synchronous (GRPO) scheduling, long-tail tool latency.

Both sides run the same code: :class:`RolloutScheduler` driving the real SPO ``<code>`` agent loop
(tiny tokenizer, token-in/token-out, interpreter tokens appended) against a simulated engine and a
simulated sandbox that only ``asyncio.sleep``. The workload is identical on both sides: sample
number ``s`` (0..S-1) always has the same number of assistant turns and the same per-turn generation
and tool latencies, all drawn from ``random.Random(seed, s, turn)``:

- turns per sample: 1 + Geometric(p_stop), capped at 8 (the SPO max assistant turns);
- generation latency per assistant turn: lognormal(log(gen_median), gen_sigma) seconds;
- tool latency per code call: lognormal(log(tool_median), tool_sigma) seconds (the long tail).

What is compared, precisely (same ``max_concurrency = C = prompts_per_batch * n`` slots):

- **group-sync** (GRPO as synchronous trainers run it): the scheduler in ``group`` mode. The driver
  submits a batch of ``prompts_per_batch`` prompts with ``n`` samples each (C samples), waits until
  every group of the batch is complete (``get_batch(prompts_per_batch)``), and only then submits the
  next batch. A batch therefore lasts as long as its slowest sample; slots that finish early idle.
- **single-stream** (SPO): the scheduler in ``single_stream`` mode. The driver keeps C samples in
  flight: every time one finishes (``get``) it submits the next, until all S samples are done.
  There is no group barrier and no batch barrier.

Throughput = S delivered samples / wall time from the first submit. The headline single-stream row
is steady state: it keeps submitting new samples (same distribution) and stops the clock at the S-th
delivery, as a training run does (stragglers finish during the next step). The row "single, drained"
submits exactly samples 0..S-1 and waits for all of them, so it also pays for the slowest sample of
the whole run; it is printed for honesty, not used for the ratio. The trainer's time is not
simulated (both sides only roll out). The ratio depends on the latency spread: the table prints the workload's own bound,
E[batch max] / E[sample], which is what group-sync loses.

    python bench/single_stream_vs_group.py [--batches 16 --prompts-per-batch 8 --n 8]
"""

from __future__ import annotations

import argparse
import sys
import asyncio
import math
import random
import re
import statistics
import time
from typing import Dict, List, Tuple

from megatron_spo.models.tiny import make_tiny_tokenizer
from megatron_spo.rollout.agent_loop import AgentLoopConfig, SPOCodeAgentLoop
from megatron_spo.rollout.engine import GenerateResult
from megatron_spo.rollout.sample import RolloutRequest
from megatron_spo.rollout.scheduler import RolloutScheduler, SchedulerConfig

CODE_TURN = "Let me check.<code>\n```python\nsim({s}, {t})\n```\n</code>"
SIM_CALL = re.compile(r"sim\((\d+), (\d+)\)")
FINAL_TURN = "</think>The answer is \\boxed{{s}}.<|im_end|>"


class Workload:
    """Per-sample turns and latencies, a pure function of (seed, sample, turn)."""

    def __init__(self, args):
        self.a = args

    def _rng(self, s: int, t: int, what: int) -> random.Random:
        return random.Random(hash((self.a.seed, s, t, what)))

    def turns(self, s: int) -> int:
        r, k = self._rng(s, -1, 0), 1
        while k < 8 and r.random() > self.a.p_stop:
            k += 1
        return k

    def gen_latency(self, s: int, t: int) -> float:
        return self._rng(s, t, 1).lognormvariate(math.log(self.a.gen_median), self.a.gen_sigma)

    def tool_latency(self, s: int, t: int) -> float:
        return self._rng(s, t, 2).lognormvariate(math.log(self.a.tool_median), self.a.tool_sigma)

    def sample_time(self, s: int) -> float:
        k = self.turns(s)
        return sum(self.gen_latency(s, t) for t in range(k)) + sum(self.tool_latency(s, t) for t in range(k - 1))


class SimEngine:
    """Reads the sample number from the prompt's first token and the turn from the tool outputs so far."""

    name = "sim"
    weight_version = 0

    def __init__(self, tok, work: Workload):
        self.tok, self.work = tok, work
        self.interp = tok.convert_tokens_to_ids("<interpreter>")
        self.tokens = 0
        self._enc: Dict[str, List[int]] = {}

    def encode(self, text: str) -> List[int]:
        # the "model" emits these ids; cache the fixed parts so the simulated engine costs ~no CPU
        if text not in self._enc:
            self._enc[text] = self.tok.encode(text, add_special_tokens=False)
        return self._enc[text]

    async def agenerate(self, prompt, sampling):
        s, t = prompt[0] - SAMPLE_BASE, list(prompt).count(self.interp)
        await asyncio.sleep(self.work.gen_latency(s, t))
        if t < self.work.turns(s) - 1:
            pre, post = CODE_TURN.split("{s}, {t}")
            ids = self.encode(pre) + self.encode(f"{s}, {t}") + self.encode(post)
        else:
            pre, post = FINAL_TURN.split("{s}")
            ids = self.encode(pre) + self.encode(str(s)) + self.encode(post)
        ids = ids[: sampling.max_new_tokens]
        self.tokens += len(ids)
        return GenerateResult(ids, [-0.5] * len(ids), "stop", weight_version=0)


class SimTool:
    def __init__(self, work: Workload):
        self.work = work

    async def run(self, code: str) -> str:
        m = SIM_CALL.search(code)
        if m is None:
            raise ValueError(f"simulated tool got unexpected code {code!r}")
        s, t = int(m.group(1)), int(m.group(2))
        await asyncio.sleep(self.work.tool_latency(s, t))
        return f"{s * t}\n"


SAMPLE_BASE = 1000  # prompt token ids: [SAMPLE_BASE + sample number, filler...] (any ids work for a simulated engine)


def request_for(sample_numbers: List[int], uid: str) -> RolloutRequest:
    return RolloutRequest(uid=uid, prompt_ids=[SAMPLE_BASE + sample_numbers[0]] + [201] * 15, n=len(sample_numbers),
                          meta={"samples": sample_numbers})


def make_rollout(loop: SPOCodeAgentLoop):
    async def rollout(engine, request, index):
        # replica ``index`` of a group is its own sample number (its own latencies)
        s = request.meta["samples"][index]
        req = RolloutRequest(uid=request.uid, prompt_ids=[SAMPLE_BASE + s] + list(request.prompt_ids[1:]))
        return await loop.run(engine, req, index)

    return rollout


async def run_group_sync(loop, engine, args) -> Tuple[float, int]:
    c = args.prompts_per_batch * args.n
    sch = RolloutScheduler(engine, make_rollout(loop), SchedulerConfig(mode="group", max_concurrency=c))
    t0, done = time.perf_counter(), 0
    for b in range(args.batches):
        for p in range(args.prompts_per_batch):
            first = (b * args.prompts_per_batch + p) * args.n
            sch.submit(request_for(list(range(first, first + args.n)), uid=f"g{b}-{p}"))
        groups = await sch.get_batch(args.prompts_per_batch, timeout=600)
        done += sum(len(g) for g in groups)
    return time.perf_counter() - t0, done


async def run_single_stream(loop, engine, args, drain: bool) -> Tuple[float, int]:
    """Keep C samples in flight; stop when S samples have been delivered.

    ``drain=True``: only samples 0..S-1 are ever submitted, so the clock also waits for the slowest of
    them (the end of a finite run). ``drain=False`` (steady state, the headline): new samples keep being
    submitted (numbers S, S+1, ... from the same distribution), and the clock stops at the S-th
    delivered sample; the stragglers still running would be delivered in the next training step.
    """
    c = args.prompts_per_batch * args.n
    total = args.batches * c
    sch = RolloutScheduler(engine, make_rollout(loop), SchedulerConfig(mode="single_stream", max_concurrency=c))
    t0, submitted, done = time.perf_counter(), 0, 0
    while submitted < c:
        sch.submit(request_for([submitted], uid=f"s{submitted}"))
        submitted += 1
    while done < total:
        await sch.get(timeout=600)
        done += 1
        if submitted < total or not drain:
            sch.submit(request_for([submitted], uid=f"s{submitted}"))
            submitted += 1
    wall = time.perf_counter() - t0
    await sch.aclose()
    return wall, done


def main() -> None:
    quick = "--quick" in sys.argv[1:]  # smaller defaults; flags given explicitly still win
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a run well under 3 minutes: 4 batches")
    ap.add_argument("--batches", type=int, default=4 if quick else 16)
    ap.add_argument("--prompts-per-batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=8, help="GRPO group size")
    ap.add_argument("--p-stop", type=float, default=0.35, help="chance a turn is the last one")
    ap.add_argument("--gen-median", type=float, default=0.03, help="seconds per assistant turn (median)")
    ap.add_argument("--gen-sigma", type=float, default=0.6)
    ap.add_argument("--tool-median", type=float, default=0.03, help="seconds per tool call (median)")
    ap.add_argument("--tool-sigma", type=float, default=1.5, help="lognormal sigma of tool latency (the long tail)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tok = make_tiny_tokenizer()
    work = Workload(args)
    loop = SPOCodeAgentLoop(tok, SimTool(work), AgentLoopConfig(max_response_len=4096, tool_timeout_s=600))
    c = args.prompts_per_batch * args.n
    total = args.batches * c
    times = [work.sample_time(s) for s in range(total)]
    batch_max = [max(times[b * c:(b + 1) * c]) for b in range(args.batches)]
    bound = statistics.mean(batch_max) / statistics.mean(times)

    rows: Dict[str, Tuple[float, int]] = {}
    rows["group-sync"] = asyncio.run(run_group_sync(loop, SimEngine(tok, work), args))
    rows["single-stream"] = asyncio.run(run_single_stream(loop, SimEngine(tok, work), args, drain=False))
    rows["single, drained"] = asyncio.run(run_single_stream(loop, SimEngine(tok, work), args, drain=True))

    print(f"workload: {total} samples, concurrency {c} ({args.prompts_per_batch} prompts x n={args.n}), "
          f"turns mean {statistics.mean(work.turns(s) for s in range(total)):.2f}, "
          f"sample time mean {statistics.mean(times) * 1e3:.1f} ms / p50 {statistics.median(times) * 1e3:.1f} ms / "
          f"max {max(times) * 1e3:.0f} ms; E[batch max]/E[sample] = {bound:.2f}")
    print(f"{'schedule':<17}{'samples':>9}{'wall s':>9}{'samples/s':>11}{'ideal s':>9}")
    ideal = {"group-sync": sum(batch_max), "single-stream": sum(times) / c, "single, drained": sum(times) / c}
    for name, (wall, n) in rows.items():
        print(f"{name:<17}{n:>9}{wall:>9.2f}{n / wall:>11.1f}{ideal[name]:>9.2f}")
    print("(ideal s: group-sync = sum of batch maxima; single-stream = total work / slots, no drain; "
          "'single, drained' also waits for the slowest of the S samples)")
    ratio = (rows["single-stream"][1] / rows["single-stream"][0]) / (rows["group-sync"][1] / rows["group-sync"][0])
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
