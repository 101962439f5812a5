"""``megatron-spo estimate-values``: the offline value file that initialises SPO's tracker (docs/algorithms.md §1.3).

The dataset is split into ``--subsets`` contiguous subsets. For each subset, ``n`` responses per
prompt are sampled with the initial policy through the same rollout phase (agent loop and reward)
the trainer uses (reward ``data.reward`` unless ``--reward``), with the recipe's validation sampling
by default (n = ``algo.spo.offline_n`` = 8; ``rollout.eval_temperature/eval_top_p/eval_top_k`` = 0.6 /
0.95 / 20). The subset's ``{prompt_key: [scores]}`` is written atomically to ``subset_{i}.json``.
Subsets whose file exists are skipped, so an interrupted run continues at the next unfinished
subset. Finally all subsets are merged into ``offline_values.json``, keeping at most ``n`` scores
per prompt (random subsample, seeded: :func:`~megatron_spo.trainer.offline_values.merge_scores`).

A ``manifest.json`` records the dataset, its prompt keys (hash), ``n`` and the subset count; a
resumed run with different ones stops with an error naming what changed, instead of mixing files.
Failed samples (engine errors after retries) are not scores of the policy: they are left out and
counted; a subset where more than ``--max-error-frac`` of the samples failed is not written (so the
next run retries it) and the command stops with an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from megatron_spo.config import ConfigError, load_config
from megatron_spo.config.cli import add_config_arguments
from megatron_spo.data import DataError, PromptRecord, load_prompts
from megatron_spo.rollout.build import (
    add_sampling_arguments, build_engine, close_engine, context_len, load_tokenizer, sampling_from_args,
)
from megatron_spo.rollout.engine import EngineError
from megatron_spo.rollout.phase import RolloutPhase
from megatron_spo.trainer.offline_values import Scores, load_scores, merge_scores, save_scores

log = logging.getLogger(__name__)

OUTPUT_NAME = "offline_values.json"


class EstimateError(RuntimeError):
    """The run cannot continue safely (changed inputs on resume, too many failed samples)."""


def split_subsets(records: Sequence[PromptRecord], subsets: int) -> List[List[PromptRecord]]:
    """``subsets`` contiguous chunks whose sizes differ by at most one (in dataset order)."""
    if subsets < 1:
        raise ValueError(f"--subsets must be >= 1, got {subsets}")
    if subsets > len(records):
        raise ValueError(f"--subsets {subsets} is more than the {len(records)} prompts of the dataset")
    n = len(records)
    return [list(records[i * n // subsets:(i + 1) * n // subsets]) for i in range(subsets)]


def subset_path(out_dir: Path, i: int) -> Path:
    return out_dir / f"subset_{i}.json"


def _manifest(data_path: str, records: Sequence[PromptRecord], subsets: int, n: int) -> Dict[str, Any]:
    digest = hashlib.sha256("\n\x00".join(r.key for r in records).encode("utf-8")).hexdigest()
    return {"data": str(data_path), "prompts": len(records), "keys_sha256": digest, "subsets": subsets, "n": n}


def _check_manifest(out_dir: Path, manifest: Dict[str, Any]) -> None:
    path = out_dir / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in manifest.items() if k != "data" and old.get(k) != v]
        if changed:
            raise EstimateError(f"{out_dir} holds subsets of a different run ({'; '.join(changed)}); use a fresh "
                                f"--out directory or delete it to start over")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(path)


def subset_scores(samples) -> Scores:
    """``{prompt_key: [reward, ...]}`` of the samples that did not fail (in sample order)."""
    scores: Scores = {}
    for s in samples:
        if s.ok:
            scores.setdefault(s.key, []).append(float(s.reward or 0.0))
    return scores


def estimate_values(records: Sequence[PromptRecord], phase: RolloutPhase, out_dir, *, subsets: int, n: int,
                    data_path: str = "", seed: int = 0, max_error_frac: float = 0.1,
                    on_subset: Optional[Callable[[int, Dict[str, float]], Any]] = None,
                    progress: bool = False) -> Dict[str, Any]:
    """Run (or resume) the offline value pipeline and write ``offline_values.json`` into ``out_dir``.

    Args:
        records: the dataset's prompts (validated).
        phase: the rollout phase (engine, agent loop, reward, sampling).
        out_dir: directory for ``manifest.json``, ``subset_{i}.json`` and the merged file.
        subsets: number of subsets; n: responses per prompt (and the cap of the merged lists).
        seed: seed of the merge's random subsample.
        max_error_frac: largest fraction of failed samples a subset may have and still be written.
        on_subset: called after each subset is written, with its index and rollout metrics.

    Returns:
        a summary: subsets sampled / skipped, prompts, scores, mean score, missing keys, path.

    Raises:
        EstimateError: a resumed run with other inputs, or a subset with too many failed samples.
    """
    if n < 1:
        raise ValueError(f"n (responses per prompt) must be >= 1, got {n}")
    out = Path(out_dir)
    chunks = split_subsets(records, subsets)
    _check_manifest(out, _manifest(data_path, records, subsets, n))
    sampled, skipped_subsets, failed, skipped_rows = [], [], 0, 0
    for i, chunk in enumerate(chunks):
        path = subset_path(out, i)
        if path.exists():
            skipped_subsets.append(i)
            log.info("estimate-values: subset %d already written (%s), skipping", i, path)
            continue
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(chunk) * n, desc=f"subset {i + 1}/{subsets}", unit="sample", file=sys.stderr)
        try:
            batch = phase.run(chunk, n, mode="group", uid_prefix=f"s{i}-", source=data_path,
                              on_sample=(lambda s: bar.update(1)) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        errors = int(batch.metrics["rollout/errors"])
        if batch.samples and errors > max_error_frac * len(batch.samples):
            first = next(s for s in batch.samples if not s.ok).errors[-1]
            raise EstimateError(f"subset {i}: {errors} of {len(batch.samples)} samples failed (more than "
                                f"--max-error-frac {max_error_frac}); not written, a re-run retries it. First: {first}")
        failed += errors
        skipped_rows += len(batch.skipped)
        save_scores(subset_scores(batch.samples), path)
        sampled.append(i)
        log.info("estimate-values: subset %d: %d prompts, reward mean %.4f, %d failed samples -> %s",
                 i, len(chunk), batch.metrics["rollout/reward_mean"], errors, path)
        if on_subset is not None:
            on_subset(i, batch.metrics)
    parts = [load_scores(subset_path(out, i)) for i in range(subsets)]
    merged = merge_scores(parts, n, seed=seed)
    target = save_scores(merged, out / OUTPUT_NAME)
    keys = {r.key for r in records}
    missing = sorted(keys - set(merged))
    if missing:
        log.warning("estimate-values: %d prompt(s) have no score (skipped or every sample failed), e.g. %r",
                    len(missing), missing[0][:60])
    total = sum(len(v) for v in merged.values())
    return {"path": str(target), "subsets_sampled": sampled, "subsets_skipped": skipped_subsets,
            "prompts": len(merged), "scores": total,
            "mean_score": sum(sum(v) for v in merged.values()) / total if total else 0.0,
            "missing_keys": len(missing), "failed_samples": failed, "skipped_rows": skipped_rows}


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.rollout = sampling_from_args(cfg, args)
        n = args.n if args.n is not None else (cfg.algo.spo.offline_n or 8)
        data_path = args.data or cfg.data.train_path
        if not data_path:
            raise ConfigError("no dataset: pass --data FILE or set data.train_path")
        data = load_prompts(data_path, cfg.data.prompt_key, cfg.data.answer_key, skip_bad_rows=cfg.data.skip_bad_rows)
        out = Path(args.out or Path(cfg.io.run_dir) / "offline_values")
        engine = build_engine(cfg)
        try:
            tokenizer = load_tokenizer(cfg, engine)
            with RolloutPhase(engine, tokenizer, cfg.rollout, reward=args.reward or cfg.data.reward,
                              max_prompt_len=cfg.data.max_prompt_len, skip_bad_rows=cfg.data.skip_bad_rows,
                              context_len=context_len(engine)) as phase:
                summary = estimate_values(data.records, phase, out, subsets=args.subsets, n=n, data_path=str(data_path),
                                          seed=args.seed, max_error_frac=args.max_error_frac,
                                          progress=not args.no_progress)
        finally:
            close_engine(engine)
    except (ConfigError, DataError, EngineError, EstimateError, ValueError, KeyError, ImportError) as err:
        print(f"estimate-values: error: {err}", file=sys.stderr)
        return 2
    print(f"subsets sampled: {summary['subsets_sampled']}, already done: {summary['subsets_skipped']}")
    print(f"prompts: {summary['prompts']} (bad rows skipped at load: {len(data.skipped)}, over-long: "
          f"{summary['skipped_rows']}, without scores: {summary['missing_keys']}), scores: {summary['scores']}, "
          f"mean score: {summary['mean_score']:.4f}, failed samples: {summary['failed_samples']}")
    print(f"# wrote {summary['path']}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("estimate-values", help="offline value file for the SPO prior (resumable)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--data", default=None, help="prompt dataset (default data.train_path)")
    parser.add_argument("--subsets", type=int, default=5, help="subsets to split the dataset into (default %(default)s)")
    parser.add_argument("--n", type=int, default=None, help="responses per prompt (default algo.spo.offline_n = 8)")
    add_sampling_arguments(parser)
    parser.add_argument("--out", default=None, help="output directory (default {io.run_dir}/offline_values)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the merge's subsample (default %(default)s)")
    parser.add_argument("--max-error-frac", type=float, default=0.1,
                        help="largest fraction of failed samples a subset may have (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_main)
