"""Evaluate one benchmark: ``k`` samples per problem through a rollout phase, scored as avg@k / maj@k / pass@k.

Shared by ``megatron-spo eval`` (:mod:`megatron_spo.commands.evaluate`) and the validation inside a
training run (:mod:`megatron_spo.trainer.validation`). A sample counts as correct when it did not fail
and its reward is > 0; the answer used for majority voting is the content of the last ``\\boxed{}``
of the response.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from megatron_spo.data import PromptDataset
from megatron_spo.rollout.phase import RolloutPhase
from megatron_spo.rollout.rewards import last_boxed
from megatron_spo.trainer.eval_metrics import summarize

log = logging.getLogger(__name__)


class EvalError(RuntimeError):
    """The evaluation cannot produce meaningful numbers (e.g. every sample failed)."""


def extract_answer(response: str) -> Optional[str]:
    """The stripped content of the last ``\\boxed{}`` in ``response`` (None if there is none)."""
    answer = last_boxed(response)
    return answer.strip() if answer is not None and answer.strip() else None


def default_ks(k: int) -> List[int]:
    """pass@k values reported by default: powers of two below ``k``, and ``k``."""
    ks, p = [], 1
    while p < k:
        ks.append(p)
        p *= 2
    return ks + [k]


def benchmark_names(paths: Sequence[str]) -> List[str]:
    """File stems, made unique with a suffix when two files share one."""
    names: List[str] = []
    for p in paths:
        stem = Path(p).stem or Path(p).name
        name, i = stem, 2
        while name in names:
            name, i = f"{stem}_{i}", i + 1
        names.append(name)
    return names


def evaluate_benchmark(name: str, data: PromptDataset, phase: RolloutPhase, k: int, ks: Sequence[int], *,
                       progress: bool = True) -> Dict[str, Any]:
    """Roll out ``k`` samples per problem of ``data`` and compute the metrics.

    Returns:
        ``{"metrics": summarize(...) + errors/samples/skipped_rows, "rollout": phase metrics,
        "samples": per-sample records}``.

    Raises:
        EvalError: every sample failed.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=len(data) * k, desc=f"eval {name}", unit="sample", disable=not progress, file=sys.stderr)
    try:
        batch = phase.run(data.records, k, mode="group", source=data.path, on_sample=lambda s: bar.update(1))
    finally:
        bar.close()
    if not batch.samples:
        raise EvalError(f"benchmark {name!r} ({data.path}): no problem left to evaluate (skipped rows: "
                        f"{len(batch.skipped)})")
    errors = [s for s in batch.samples if not s.ok]
    if len(errors) == len(batch.samples):
        raise EvalError(f"benchmark {name!r}: all {len(errors)} samples failed; first error: {errors[0].errors[-1]}")
    correct: List[List[float]] = []
    answers: List[List[Optional[str]]] = []
    records: List[Dict[str, Any]] = []
    for group in batch.groups():
        correct.append([1.0 if s.ok and (s.reward or 0.0) > 0 else 0.0 for s in group])
        answers.append([extract_answer(s.response_text) if s.ok else None for s in group])
        for s, c, a in zip(group, correct[-1], answers[-1]):
            records.append({"benchmark": name, "row": s.meta["row"], "key": s.key, "sample": s.group_index,
                            "ground_truth": s.ground_truth, "reward": s.reward, "correct": c, "answer": a,
                            "finish_reason": s.finish_reason, "response_tokens": len(s.response_ids),
                            "errors": s.errors, "response": s.response_text})
    metrics = summarize(correct, answers, [x for x in ks if x <= k])
    metrics["samples"] = float(len(batch.samples))
    metrics["errors"] = float(len(errors))
    metrics["skipped_rows"] = float(len(data.skipped) + len(batch.skipped))
    if errors:
        log.warning("eval %s: %d of %d samples failed (counted as wrong); first: %s", name, len(errors),
                    len(batch.samples), errors[0].errors[-1])
    return {"metrics": metrics, "rollout": batch.metrics, "samples": records}
