"""bench/sandbox_latency.py (P7) runs end to end and prints every row and a parsable ratio (tiny run).

The numbers themselves are the benchmark's business (measured side by side in one run, not asserted here).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import need_isolation

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sandbox_latency.py"


def test_sandbox_latency_bench_tiny_run():
    need_isolation()
    proc = subprocess.run([sys.executable, str(BENCH), "--rounds", "3", "--warmup", "1"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("isolation: {'isolation': 'bwrap'")
    for row in ["bare python -c", "isolated, warm", "isolated, cold", "cold, no cgroup", "warm + HTTP",
                "warm, back to back"]:
        assert any(line.startswith(row + " ") for line in lines), (row, proc.stdout)
    assert re.fullmatch(r"ratio: \d+\.\d\d", lines[-1]), lines[-1]
    assert "exited while idle" not in proc.stderr  # the cold rows must not sweep the warm row's sandbox
