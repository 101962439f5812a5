"""Build a :class:`Config` from a YAML file and dotted ``key=value`` overrides, enforcing the types.

Unknown keys are errors with close-match suggestions; each value is checked against its field's
annotation (``Literal`` values, ``Optional``, ``List[...]``, bool / int / float / str).
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Union

import yaml

from megatron_spo.config.checks import validate
from megatron_spo.config.errors import ConfigError
from megatron_spo.config.schema import Config
from megatron_spo.config.yaml_io import read_yaml_mapping


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """Build a validated :class:`Config` from an optional YAML file and dotted ``key=value`` overrides.

    Override values are parsed as YAML scalars/lists (``0.9``, ``true``, ``null``, ``[a, b]``).

    Raises:
        ConfigError: unreadable file, a key written twice in the file, unknown key, wrong type, or a
            value out of range.
    """
    data: Dict[str, Any] = read_yaml_mapping(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(data, item)
    cfg = build(Config, data, "")
    validate(cfg)
    return cfg


def apply_override(data: Dict[str, Any], item: str) -> None:
    """Set the dotted ``section.key=value`` ``item`` in the nested mapping ``data`` (sections created)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, data: Any, key: str) -> Any:
    """An instance of the section dataclass ``cls`` from the mapping ``data`` found at dotted ``key``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key or 'config'} must be a mapping of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for name in data:
        if name not in known:
            where = f"{key}.{name}" if key else str(name)
            close = difflib.get_close_matches(str(name), list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {where!r}{hint}")
    kwargs = {}
    for name in known:
        if name in data:
            where = f"{key}.{name}" if key else name
            kwargs[name] = coerce(data[name], hints[name], where)
    return cls(**kwargs)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int -> float where harmless)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if is_dataclass(tp):
        return build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None:
            if len(non_none) != len(args):
                return None
            raise ConfigError(f"{key} must not be null")
        return coerce(value, non_none[0], key)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads `1e-6` (no dot in the mantissa) as a string; accept numeric text.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")  # a bug in the schema
