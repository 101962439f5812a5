"""Built-in reward functions: the SPO strict ``\\boxed{}`` rule, math-verify equivalence, DAPO overlong shaping.

Reward functions take the decoded response text (special tokens kept, tool text included) and the
ground truth, and return a float. They are registered by name in ``reward_registry``.

- :func:`spo_strict_boxed` is docs/algorithms.md §1.12 (verl ``spo_retool.compute_score`` with
  ``math_dapo`` strict box verification): exactly one ``</think>``; nothing tool-ish
  (``<code>``/``<interpreter>``) after it; the last ``\\boxed{...}`` (brace matched) within the last
  100 of the last 300 characters must equal the ground truth string exactly; everything else is 0
  (verl's -1 mapped to 0).
- :func:`math_verify_score` checks the answer with ``math_verify.parse`` / ``math_verify.verify``
  (symbolic equivalence: ``0.5 == \\frac{1}{2}``, ``x^2+1 == 1+x^2``, ...).
- :func:`dapo_overlong_penalty` is the DAPO length shaping of docs/algorithms.md §4, an optional additive term.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

BOXED = "\\boxed{"


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` in ``text``, braces matched; ``None`` if absent or unclosed."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth = 0
    for i in range(start + len(BOXED) - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(BOXED): i]
    return None


def spo_strict_boxed(response: str, ground_truth: Any) -> float:
    """SPO reward (docs/algorithms.md §1.12): 1.0 on a strict boxed match, else 0.0."""
    if response.count("</think>") != 1:
        return 0.0
    after = response.split("</think>", 1)[1]
    if "<code>" in after or "<interpreter>" in after:
        return 0.0
    # verl keeps the last 300 characters, then strict verification keeps the last 100 of those
    tail = response[-300:][-100:]
    pred = last_boxed(tail)
    return 1.0 if pred is not None and pred == str(ground_truth) else 0.0


def _timeout() -> Optional[int]:
    # math-verify times out with SIGALRM, which only works in the main thread; elsewhere
    # (the ThreadedScheduler's loop thread) it must be disabled or it raises.
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_verify_score(response: str, ground_truth: Any) -> float:
    """1.0 when math-verify finds the response's answer equivalent to ``ground_truth``, else 0.0.

    The ground truth is parsed as LaTeX (wrapped in ``\\boxed{}`` unless it already has ``\\boxed`` or
    ``$``); the response is parsed with math-verify's default extraction (boxed answers first).
    """
    from math_verify import parse, verify

    gt = str(ground_truth)
    gold = parse(gt if (BOXED in gt or "$" in gt) else BOXED + gt + "}", parsing_timeout=_timeout())
    if not gold:
        raise ValueError(f"math-verify cannot parse the ground truth {gt!r}")
    pred = parse(response, parsing_timeout=_timeout())
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=_timeout()) else 0.0


def dapo_overlong_penalty(length: int, max_len: int, buffer_len: int, factor: float = 1.0) -> float:
    """DAPO soft overlong penalty: 0 up to ``max_len - buffer_len`` tokens, then falls linearly to ``-factor`` at ``max_len``.

    ``min(0, -(length - (max_len - buffer_len)) / buffer_len * factor)``; ``length`` in tokens.
    """
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(f"dapo_overlong_penalty: need 0 < buffer_len <= max_len, got buffer_len={buffer_len}, "
                         f"max_len={max_len}")
    return min(0.0, -(length - (max_len - buffer_len)) / buffer_len * factor)
