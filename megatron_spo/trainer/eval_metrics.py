"""Evaluation metrics over k samples per problem: avg@k, maj@k and unbiased pass@k.

Inputs per problem are the k sampled answers' correctness (0/1, or a score in [0, 1]) and, for
majority voting, the extracted answer strings.
"""

from __future__ import annotations

from collections import Counter
from math import comb
from typing import Dict, List, Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k) (Chen et al. 2021).

    Raises:
        ValueError: k > n, c > n, or negative counts.
    """
    if n < 0 or c < 0 or k <= 0:
        raise ValueError(f"pass_at_k: need n >= 0, c >= 0, k >= 1; got n={n}, c={c}, k={k}")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} correct out of n={n} samples")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} is larger than the n={n} samples drawn")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: Sequence[Optional[str]], correct: Sequence[float]) -> float:
    """1.0 if the most frequent non-empty answer is a correct one, else 0.0.

    Ties are broken by first occurrence, so the result is deterministic. Samples with no extracted
    answer (None or "") do not vote; if none votes the problem counts as wrong.
    """
    if len(answers) != len(correct):
        raise ValueError(f"majority_correct: {len(answers)} answers but {len(correct)} correctness values")
    votes = Counter(a for a in answers if a)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(a for a in answers if a and votes[a] == top)
    return float(max(c for a, c in zip(answers, correct) if a == winner) > 0)


def summarize(
    correct: Sequence[Sequence[float]], answers: Optional[Sequence[Sequence[Optional[str]]]] = None,
    ks: Sequence[int] = (1,),
) -> Dict[str, float]:
    """Benchmark-level metrics averaged over problems.

    Args:
        correct: per problem, the k samples' scores in [0, 1] (> 0 counts as correct for pass@k).
        answers: per problem, the extracted answers, for maj@k (omit to skip it).
        ks: the k values for pass@k (each ≤ the samples per problem).

    Returns:
        ``{"avg@n", "maj@n" (if answers), "pass@k" for each k, "problems"}`` with n the samples per problem.
    """
    if not correct:
        raise ValueError("summarize: no problems")
    n = len(correct[0])
    for i, row in enumerate(correct):
        if len(row) != n:
            raise ValueError(f"summarize: problem {i} has {len(row)} samples, problem 0 has {n}")
    out: Dict[str, float] = {"problems": float(len(correct))}
    out[f"avg@{n}"] = sum(sum(row) / n for row in correct) / len(correct)
    if answers is not None:
        if len(answers) != len(correct):
            raise ValueError(f"summarize: {len(answers)} answer lists for {len(correct)} problems")
        out[f"maj@{n}"] = sum(majority_correct(a, c) for a, c in zip(answers, correct)) / len(correct)
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(1 for s in row if s > 0), k) for row in correct) / len(correct)
    return out


def format_table(results: Dict[str, Dict[str, float]]) -> str:
    """A plain-text table: one row per benchmark, one column per metric."""
    names: List[str] = []
    for metrics in results.values():
        names += [m for m in metrics if m not in names]
    header = ["benchmark"] + names
    rows = [[bench] + [f"{metrics[m]:.4f}" if m in metrics else "-" for m in names] for bench, metrics in results.items()]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    return "\n".join(lines)
