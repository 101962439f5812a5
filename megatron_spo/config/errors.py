"""The config error and the range checks that raise it; every message names the dotted key."""

from __future__ import annotations

from typing import Optional


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range; the message names the key."""


def positive(key: str, value: float) -> None:
    """``value`` > 0."""
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def at_least(key: str, value: float, low: float) -> None:
    """``value`` >= ``low``."""
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value!r}")


def in_range(key: str, value: float, low: Optional[float], high: Optional[float],
             low_open: bool = False, high_open: bool = False) -> None:
    """``value`` in the interval from ``low`` to ``high`` (None: unbounded; ``*_open``: that end excluded)."""
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{key} must be in {interval}, got {value!r}")
