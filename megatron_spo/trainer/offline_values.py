"""The offline value file of SPO's prior: ``{prompt_key: [scores]}``, merged from per-subset files.

`megatron-spo estimate-values` samples n responses per prompt with the initial policy, one subset of
the dataset at a time (so an interrupted run resumes at the next subset), then merges the subsets
keeping at most n scores per prompt, subsampled at random with a seeded generator (docs/algorithms.md §1.3).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Union

Scores = Dict[str, List[float]]


def merge_scores(parts: Iterable[Scores], n: int, seed: int = 0) -> Scores:
    """Concatenate the score lists of each prompt key over ``parts``, keeping at most ``n`` at random.

    Raises:
        ValueError: ``n`` < 1, or a score that is not a finite number (naming the key).
    """
    if n < 1:
        raise ValueError(f"merge_scores: n must be >= 1, got {n}")
    merged: Scores = {}
    for part in parts:
        for key, scores in part.items():
            for s in scores:
                if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s or abs(s) == float("inf"):
                    raise ValueError(f"offline values: prompt {key[:60]!r} has a non-finite or non-numeric score {s!r}")
            merged.setdefault(key, []).extend(float(s) for s in scores)
    rng = random.Random(seed)
    for key in sorted(merged):  # sorted: the subsample does not depend on dict order
        if len(merged[key]) > n:
            merged[key] = rng.sample(merged[key], n)
    return merged


def save_scores(scores: Scores, path: Union[str, Path]) -> Path:
    """Write ``scores`` as JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(scores, ensure_ascii=False))
    tmp.replace(path)
    return path


def load_scores(path: Union[str, Path], expected_keys: Sequence[str] = ()) -> Scores:
    """Read an offline values file and check it against the dataset's prompt keys.

    Raises:
        ValueError: unreadable or malformed file, or (when ``expected_keys`` is given) no key of the
            file matches a dataset prompt, which means the prompt keys were built differently.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"offline values {str(path)!r} is not readable JSON: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"offline values {str(path)!r} must be a JSON object {{prompt_key: [scores]}}")
    if expected_keys and data:
        expected = set(expected_keys)
        if not any(k in expected for k in data):
            sample = next(iter(data))
            raise ValueError(
                f"offline values {str(path)!r}: none of its {len(data)} prompt keys matches a dataset prompt "
                f"(e.g. file key {sample[:60]!r} vs dataset key {next(iter(expected))[:60]!r}); keys are the "
                "stripped first user message"
            )
    return data
