"""Write the arithmetic prompts of the SmolLM2 sandbox example as jsonl: ``{"prompt", "answer"}`` rows.

Two-operand problems with two-digit operands, ``a + b``, ``a - b`` and ``a * b`` ("What is 37 * 48?"),
answers as integer strings. Additions are within reach of a 135M model without a tool; products of
two two-digit numbers mostly are not, which is where a ``<code>`` block run in the sandbox pays.

Usage: ``python examples/smollm2_sandbox/make_data.py OUT.jsonl [--n 300] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def problems(n: int, seed: int = 0) -> list:
    """``n`` distinct rows ``{"prompt": "What is a OP b?", "answer": str(result)}``, deterministic in ``seed``."""
    rng = random.Random(seed)
    seen, rows = set(), []
    if n > 3 * 90 * 90:
        raise ValueError(f"--n {n}: only {3 * 90 * 90} distinct problems exist")
    while len(rows) < n:
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice(sorted(OPS))
        prompt = f"What is {a} {op} {b}?"
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": str(OPS[op](a, b))})
    return rows


def write(path: Path, n: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in problems(n, seed)))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=300, help="number of problems (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write(args.out, args.n, args.seed))
