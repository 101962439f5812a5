"""Guarded imports: the empty transformer-engine meta-package is detected and explained."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from megatron_spo.optional import require


def _run(code: str, extra_path: str) -> subprocess.CompletedProcess:
    env_code = f"import sys; sys.path.insert(0, {extra_path!r})\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True, timeout=120)


def test_broken_meta_package_is_named(tmp_path):
    # What `pip install transformer-engine` leaves on a CPU machine: a package whose import raises RuntimeError.
    pkg = tmp_path / "transformer_engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('raise RuntimeError("Found empty transformer-engine meta package installed.")\n')
    proc = _run(
        """
        from megatron_spo.megatron.imports import BrokenTransformerEngineError, megatron_core
        try:
            megatron_core()
        except BrokenTransformerEngineError as err:
            print("CAUGHT", err)
        """,
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "CAUGHT transformer-engine is installed but cannot be imported" in proc.stdout
    assert "pip uninstall -y transformer-engine" in proc.stdout


def test_absent_transformer_engine_is_fine(tmp_path):
    proc = _run(
        """
        from megatron_spo.megatron.imports import check_transformer_engine, megatron_core
        print(check_transformer_engine(), megatron_core().__name__)
        """,
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "megatron.core"]


def test_missing_optional_extra_names_the_extra():
    with pytest.raises(ImportError, match=r"Ray fleet needs the optional package 'ray_not_here'.*pip install ray_not_here"):
        require("ray_not_here", "the Ray fleet")
    with pytest.raises(ImportError, match=r"pip install 'megatron-spo\[sglang\]'"):
        require("sglang.does_not_exist_here", "the SGLang client")
