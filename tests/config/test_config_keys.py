"""Config keys: each documented in one line, `config keys` lists exactly the tree, removed keys are unknown."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from megatron_spo.cli import main
from megatron_spo.config import Config, ConfigError, iter_keys, load_config


def _leaf_keys(tree: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted names of the non-mapping values of a nested dict (the tree as it is saved)."""
    out: List[str] = []
    for name, value in tree.items():
        if isinstance(value, dict):
            out += _leaf_keys(value, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_every_key_has_a_one_line_description():
    keys = iter_keys()
    assert keys
    missing = [k.name for k in keys if not k.help.strip() or "\n" in k.help]
    assert not missing, f"keys without a one-line description: {missing}"


def test_cli_keys_lists_exactly_the_keys_of_the_tree(capsys):
    assert main(["config", "keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split(":", 1)[0] for line in lines]
    assert listed == _leaf_keys(Config().to_dict())
    by_name = dict(zip(listed, lines))
    assert by_name["algo.spo.rho_min"].startswith("algo.spo.rho_min: float = 0.875  # lower clip of rho")
    assert by_name["rollout.urls"].startswith("rollout.urls: list[str] = []  # ")
    assert by_name["parallel.virtual_pipeline"].startswith("parallel.virtual_pipeline: int | null = None  # ")
    for line in lines:
        assert line.split("  # ", 1)[1].strip(), line


def test_cli_keys_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["config", "keys", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "type = default  # description" in out and "--set section.key=value" in out


def test_removed_keys_are_unknown(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(overrides=["rollout.max_staleness=0"])
    path = tmp_path / "old.yaml"
    path.write_text("rollout:\n  max_staleness: 0\n")
    with pytest.raises(ConfigError, match="unknown config key 'rollout.max_staleness'"):
        load_config(path)
