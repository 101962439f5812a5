"""``megatron-spo eval``: avg@k, maj@k and unbiased pass@k on local benchmark files.

For each benchmark file (parquet / jsonl / json / csv, or an HF ``save_to_disk`` directory; ``--data``
repeated, or ``data.eval_paths``), every problem gets ``k`` samples through the same rollout phase
the trainer uses (``rollout.agent`` picks single-turn, SPO ``<code>`` or Hermes tool calls), with the
validation sampling of the SPO recipe by default (``rollout.eval_temperature/eval_top_p/eval_top_k``
= 0.6 / 0.95 / 20; ``rollout.eval_samples`` = 16 samples per problem). Each sample is scored by the
reward function (``--reward``, default ``data.reward``); it counts as correct when its reward is > 0.
The answer used for majority voting is the content of the last ``\\boxed{}`` of the response.

Written into the output directory (default ``{io.run_dir}/eval``):
- ``eval.txt``: the table printed to stdout (one row per benchmark);
- ``eval.json``: the metrics per benchmark, the settings, and the rollout counters;
- ``eval_samples.jsonl``: one line per sample (row, prompt key, reward, answer, response text).

A failed sample (engine error after retries) counts as wrong and is reported in ``errors``; if every
sample of a benchmark failed, the command stops with an error instead of reporting zeros.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from megatron_spo.config import Config, ConfigError, load_config
from megatron_spo.config.cli import add_config_arguments
from megatron_spo.data import DataError, load_prompts
from megatron_spo.rollout.build import (
    add_sampling_arguments, build_engine, close_engine, context_len, load_tokenizer, sampling_from_args,
)
from megatron_spo.rollout.engine import Engine, EngineError
from megatron_spo.rollout.phase import RolloutPhase
from megatron_spo.trainer.benchmark import EvalError, benchmark_names, default_ks, evaluate_benchmark
from megatron_spo.trainer.eval_metrics import format_table


def run_eval(cfg: Config, paths: Sequence[str], *, k: int, ks: Optional[Sequence[int]] = None,
             reward: Any = None, out_dir: Optional[str] = None, limit: Optional[int] = None,
             engine: Optional[Engine] = None, tool=None, progress: bool = True) -> Dict[str, Any]:
    """Evaluate the benchmark files ``paths`` and write ``eval.txt``, ``eval.json``, ``eval_samples.jsonl``.

    ``cfg.rollout`` holds the sampling already (see :func:`~megatron_spo.rollout.phase.with_sampling`);
    ``reward`` defaults to ``cfg.data.reward``. ``engine`` overrides the one ``cfg`` describes (it is
    then not closed here); ``tool`` is the code tool of tool-using agents.

    Returns:
        the ``eval.json`` content.
    """
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    ks = sorted(set(ks or default_ks(k)))
    if any(x < 1 or x > k for x in ks):
        raise ValueError(f"pass@k values {ks} must lie in [1, k={k}]")
    reward = reward or cfg.data.reward
    if not paths:
        raise ConfigError("no benchmark files: pass --data FILE (repeatable) or set data.eval_paths")
    datasets = {}
    for name, path in zip(benchmark_names(paths), paths):
        data = load_prompts(path, cfg.data.prompt_key, cfg.data.answer_key, skip_bad_rows=cfg.data.skip_bad_rows)
        if limit is not None:
            data.records = data.records[:limit]
        datasets[name] = data
    out = Path(out_dir or Path(cfg.io.run_dir) / "eval")
    own_engine = engine is None
    engine = build_engine(cfg) if own_engine else engine
    results: Dict[str, Dict[str, float]] = {}
    rollout_metrics: Dict[str, Dict[str, float]] = {}
    lines: List[Dict[str, Any]] = []
    try:
        tokenizer = load_tokenizer(cfg, engine)
        with RolloutPhase(engine, tokenizer, cfg.rollout, reward=reward, max_prompt_len=cfg.data.max_prompt_len,
                          skip_bad_rows=cfg.data.skip_bad_rows, context_len=context_len(engine), tool=tool) as phase:
            for name, data in datasets.items():
                res = evaluate_benchmark(name, data, phase, k, ks, progress=progress)
                results[name], rollout_metrics[name] = res["metrics"], res["rollout"]
                lines += res["samples"]
    finally:
        if own_engine:
            close_engine(engine)
    table = format_table({n: {m: v for m, v in r.items() if "@" in m} for n, r in results.items()})
    report = {
        "benchmarks": results,
        "settings": {"k": k, "pass_ks": ks, "reward": reward if isinstance(reward, str) else repr(reward),
                     "agent": cfg.rollout.agent, "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
                     "top_k": cfg.rollout.top_k, "max_response_len": cfg.rollout.max_response_len,
                     "model": cfg.model.path, "engine": cfg.rollout.engine, "urls": list(cfg.rollout.urls),
                     "data": {n: d.path for n, d in datasets.items()}},
        "rollout": rollout_metrics,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.txt").write_text(table + "\n")
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "eval_samples.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return report


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.rollout = sampling_from_args(cfg, args)
        report = run_eval(cfg, args.data or cfg.data.eval_paths, k=args.k or cfg.rollout.eval_samples, ks=args.pass_k,
                          reward=args.reward or cfg.data.reward,
                          out_dir=args.out, limit=args.limit, progress=not args.no_progress)
    except (ConfigError, DataError, EngineError, EvalError, ValueError, KeyError, ImportError) as err:
        print(f"eval: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(cfg.io.run_dir) / "eval")
    print((out / "eval.txt").read_text(), end="")
    errors = sum(int(m["errors"]) for m in report["benchmarks"].values())
    if errors:
        print(f"# {errors} sample(s) failed and count as wrong; see eval_samples.jsonl")
    print(f"# wrote {out / 'eval.txt'}, {out / 'eval.json'}, {out / 'eval_samples.jsonl'}")
    return 0


def _ks(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pass-k takes comma-separated integers, got {text!r}") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="avg@k / maj@k / pass@k on local benchmark files",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--data", action="append", default=[], metavar="FILE",
                        help="benchmark file (parquet/jsonl/json/csv or save_to_disk dir), repeatable; "
                             "default data.eval_paths")
    parser.add_argument("--k", type=int, default=None, help="samples per problem (default rollout.eval_samples = 16)")
    parser.add_argument("--pass-k", type=_ks, default=None, metavar="K1,K2,...",
                        help="pass@k values (default: powers of two below k, and k)")
    add_sampling_arguments(parser)
    parser.add_argument("--out", default=None, help="output directory (default {io.run_dir}/eval)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems of each file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_main)
