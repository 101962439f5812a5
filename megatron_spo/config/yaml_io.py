"""Config files on disk: read a YAML mapping strictly, write the resolved tree as YAML and JSON.

PyYAML silently keeps the last of two equal keys in one mapping; a config that sets a key (or a
whole section) twice is almost always a merge mistake, so reading refuses it and names both lines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import yaml

from megatron_spo.config.errors import ConfigError


def read_yaml_mapping(path: Path) -> Dict[str, Any]:
    """The top-level mapping of the YAML file ``path`` ({} for an empty file).

    Raises:
        ConfigError: missing file, invalid YAML, a key written twice in one mapping (the message
            names the dotted key and ``file:line``), or a top level that is not a mapping.
    """
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), "", path)
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return loaded


def _refuse_duplicate_keys(node: Any, prefix: str, path: Path) -> None:
    """Walk the composed YAML ``node`` tree; raise on the second occurrence of a key in a mapping."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{prefix}[{i}]", path)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: Dict[Tuple[str, str], int] = {}
    for key_node, value_node in node.value:
        name = str(key_node.value)
        dotted = f"{prefix}.{name}" if prefix else name
        # ``<<`` merge keys may repeat; the merged keys are the anchor's, not written here.
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            line, seen = key_node.start_mark.line + 1, first_line.get((key_node.tag, name))
            if seen is not None:
                raise ConfigError(f"{path}:{line}: config key {dotted!r} is written twice in this file "
                                  f"(first at line {seen}); keep one")
            first_line[(key_node.tag, name)] = line
        _refuse_duplicate_keys(value_node, dotted, path)


def dump_yaml(tree: Dict[str, Any]) -> str:
    """``tree`` as block YAML, keys in declaration order."""
    return yaml.safe_dump(tree, sort_keys=False)


def write_yaml_and_json(tree: Dict[str, Any], directory: Path, stem: str) -> Tuple[Path, Path]:
    """Write ``{stem}.yaml`` and ``{stem}.json`` into ``directory`` (created); returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    yaml_path, json_path = directory / f"{stem}.yaml", directory / f"{stem}.json"
    yaml_path.write_text(dump_yaml(tree))
    json_path.write_text(json.dumps(tree, indent=2) + "\n")
    return yaml_path, json_path
