"""Bit-for-bit reference of the demo's metrics: regenerate and compare.

``python tests/reference/demo_metrics.py check`` runs ``megatron-spo demo --steps 30`` for SPO and for
GRPO in fresh run directories and compares every non-timing metric of every logged step, bit for bit
(floats compared by their exact value), with the JSON files beside this script. ``record`` rewrites
those files from the current code.

History of the recorded files: first recorded on the code before the trainer's algorithm-step
refactor (commit 202a758); the refactored tree was identical to them up to commit 8301f5b (where the
fused local attention was still switched off). They were then re-recorded once on purpose, when
torch's fused attention became the local spec's core attention (``FUSED_LOCAL_ATTENTION`` in
``megatron_spo/megatron/model.py``), which moves the actor's numbers at float rounding (~1e-7). Set it
to False to compare against the pre-refactor numbers again (``git show 8301f5b:tests/reference/...``).

One exception, measured on the code before the refactor: the embedded engine's log-probs depend at
the 1e-8 level on which requests happen to share a decode batch (thread timing), so the metrics made
only from them (:data:`ENGINE_LOGP`) can differ between two runs of the same code (GRPO step 12 did in
1 of 3 runs: ``mismatch/token_kl`` 1.44e-08 vs 1.87e-08). They are compared to :data:`ENGINE_LOGP_TOL`;
every token, reward, loss, gradient norm and tracker value is compared exactly.

The demo runs with one thread (:data:`THREADS`). The numbers depend on the machine's floating-point
kernels (CPU, torch build): a
mismatch on another machine means "re-record there before a refactor", not "the code is wrong".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
ALGOS = ("spo", "grpo")
STEPS = 30
THREADS = 1
# Wall-clock figures (phase seconds, tokens per second, step time) differ between any two runs.
TIMING = re.compile(r"(^time$|seconds|_s$|per_s|tok/s|/time|time/|throughput|tokens_per)")


# Metrics computed only from the engine's rollout log-probs (see the module docstring).
ENGINE_LOGP = ("mismatch/token_kl", "mismatch/max_abs_logp_diff", "rollout/kl_k1", "rollout/kl_k3")
ENGINE_LOGP_TOL = 1e-7


def reference_path(algo: str) -> Path:
    return HERE / f"demo_{algo}_{STEPS}.json"


def non_timing(rows: List[Dict]) -> List[Dict]:
    return [{k: v for k, v in row.items() if not TIMING.search(k)} for row in rows]


def run_demo(algo: str, run_dir: Path) -> List[Dict]:
    """Run the demo in a fresh process (the same one the README's command starts) and read its metrics."""
    cmd = [sys.executable, "-m", "megatron_spo.cli", "demo", "--algo", algo, "--steps", str(STEPS),
           "--run-dir", str(run_dir)]
    # One thread: the float kernels' reduction order, and so every number, depends on the thread count
    # (pytest's conftest sets 1; a plain shell would use every core).
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    lines = (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
    return non_timing([json.loads(line) for line in lines if line.strip()])


def differences(expected: List[Dict], got: List[Dict]) -> List[str]:
    out = []
    if len(expected) != len(got):
        out.append(f"{len(got)} logged rows, reference has {len(expected)}")
    for i, (a, b) in enumerate(zip(expected, got)):
        for key in sorted(set(a) | set(b)):
            if key not in b:
                out.append(f"row {i} (step {a.get('step')}): {key} missing")
            elif key not in a:
                out.append(f"row {i} (step {b.get('step')}): {key} not in the reference")
            elif key in ENGINE_LOGP and abs(a[key] - b[key]) <= ENGINE_LOGP_TOL:
                continue
            elif a[key] != b[key]:
                out.append(f"row {i} (step {a.get('step')}): {key} = {b[key]!r}, reference {a[key]!r}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("record", "check"))
    parser.add_argument("--algo", choices=ALGOS, action="append", help="default: both")
    args = parser.parse_args(argv)
    failed = False
    for algo in args.algo or ALGOS:
        with tempfile.TemporaryDirectory(prefix=f"demo_ref_{algo}_") as tmp:
            rows = run_demo(algo, Path(tmp))
        if args.action == "record":
            reference_path(algo).write_text(json.dumps(rows, indent=1) + "\n")
            print(f"{algo}: recorded {len(rows)} rows, {sum(len(r) for r in rows)} values")
            continue
        diff = differences(json.loads(reference_path(algo).read_text()), rows)
        failed |= bool(diff)
        print(f"{algo}: {'identical' if not diff else f'{len(diff)} differences'} "
              f"({len(rows)} rows, {sum(len(r) for r in rows)} values)")
        for line in diff[:20]:
            print("  " + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
