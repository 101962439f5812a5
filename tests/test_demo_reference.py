"""The demo's metrics equal the recorded reference (tests/reference/demo_metrics.py): SPO and GRPO, 30 steps.

See the script's docstring for where the references come from, what is compared exactly and the one
tolerance.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "reference" / "demo_metrics.py"


@pytest.mark.slow
def test_demo_metrics_equal_the_reference(capsys):
    spec = importlib.util.spec_from_file_location("demo_metrics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(["check"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("identical") == 2, out
