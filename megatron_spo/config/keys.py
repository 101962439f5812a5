"""Every key of the config tree with its type, default and description (``megatron-spo config keys``)."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, List, Literal, Union

from megatron_spo.config.declare import description
from megatron_spo.config.schema import Config


@dataclass(frozen=True)
class KeyInfo:
    """One leaf key: dotted ``name``, printable ``type``, ``default`` value and one-line ``help``."""

    name: str
    type: str
    default: Any
    help: str

    def line(self) -> str:
        return f"{self.name}: {self.type} = {self.default!r}  # {self.help}"


def iter_keys(root: type = Config) -> List[KeyInfo]:
    """The leaf keys of the dataclass tree ``root``, depth first in declaration order."""
    out: List[KeyInfo] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in fields(cls):
            tp = hints[f.name]
            if is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                out.append(KeyInfo(f"{prefix}{f.name}", type_name(tp), getattr(defaults, f.name), description(f)))

    walk(root, "")
    return out


def describe() -> str:
    """Every config key, one a line: ``name: type = default  # description``."""
    return "\n".join(k.line() for k in iter_keys())


def type_name(tp: Any) -> str:
    """``tp`` as the config file spells it: ``'a' | 'b'``, ``int | null``, ``list[str]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, List):
        return f"list[{type_name(args[0])}]"
    return "null" if tp is type(None) else tp.__name__
