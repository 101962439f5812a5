"""Explicit registries of advantage estimators and policy losses, selected by name from the config.

Each algorithm module registers its public functions here with the decorators below; nothing is
discovered implicitly. ``megatron_spo.algos`` imports every algorithm module, so importing the
package fills the registries.
"""

from __future__ import annotations

from typing import Callable, Dict

ADVANTAGE_ESTIMATORS: Dict[str, Callable] = {}
POLICY_LOSSES: Dict[str, Callable] = {}


def _register(table: Dict[str, Callable], kind: str, name: str) -> Callable[[Callable], Callable]:
    def decorator(fn: Callable) -> Callable:
        if name in table:
            raise ValueError(f"{kind} {name!r} is registered twice ({table[name].__module__} and {fn.__module__})")
        table[name] = fn
        return fn

    return decorator


def register_advantage(name: str) -> Callable[[Callable], Callable]:
    """Register an advantage estimator under ``name`` (the value of ``algo.advantage`` in the config)."""
    return _register(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def register_loss(name: str) -> Callable[[Callable], Callable]:
    """Register a policy loss under ``name`` (the value of ``algo.loss.name`` in the config)."""
    return _register(POLICY_LOSSES, "policy loss", name)


def _lookup(table: Dict[str, Callable], kind: str, name: str) -> Callable:
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown {kind} {name!r}; registered: {sorted(table)}") from None


def get_advantage(name: str) -> Callable:
    return _lookup(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def get_loss(name: str) -> Callable:
    return _lookup(POLICY_LOSSES, "policy loss", name)
