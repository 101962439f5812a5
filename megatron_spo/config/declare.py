"""How a config key is declared: its default and its one-line description, kept in the field's metadata.

``megatron-spo config keys`` prints the description next to the type and default, so each key is
documented where it is defined and nowhere else.
"""

from __future__ import annotations

import copy
from dataclasses import Field, field
from typing import Any

HELP = "help"  # the metadata entry that holds a key's description


def key(default: Any, help: str) -> Any:
    """A dataclass field for one config key: ``default`` (a list is copied per instance) and ``help``.

    ``help`` must be a single line: it is printed as is by ``megatron-spo config keys``.
    """
    if not help.strip() or "\n" in help:
        raise ValueError(f"a config key needs a non-empty one-line description, got {help!r}")
    meta = {HELP: help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def description(f: Field) -> str:
    """The one-line description of a key declared with :func:`key` ('' for any other field)."""
    return f.metadata.get(HELP, "")
