"""Validation of a built config: every section's own ``check``, then the rules that span sections."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from megatron_spo.config.errors import ConfigError
from megatron_spo.config.schema import Config


def validate(cfg: Config) -> None:
    """Run every section's range and cross-field checks, then the cross-section rules.

    Types were enforced while building. Sections are checked depth first (``algo.spo`` before
    ``algo``), so the first error reported is the most specific one.

    Raises:
        ConfigError: the first rule ``cfg`` breaks; the message names the key(s).
    """

    def walk(obj: Any, key: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                walk(value, f"{key}.{f.name}" if key else f.name)
        if key:
            obj.check(key)

    walk(cfg, "")
    check_cross_sections(cfg)


def check_cross_sections(cfg: Config) -> None:
    """Rules between keys of different sections (megatron-core's requirements on the layout)."""
    if cfg.parallel.sequence_parallel is False and cfg.parallel.tensor > 1 and cfg.parallel.expert > 1:
        # megatron-core refuses MoE with TP > 1 during training unless sequence parallel is on.
        raise ConfigError("parallel.tensor > 1 with parallel.expert > 1 needs parallel.sequence_parallel=true")
    for name, on in (("optim.cpu_offload", cfg.optim.cpu_offload),
                     ("optim.moments_dtype=bfloat16", cfg.optim.moments_dtype != "float32")):
        if on and not cfg.parallel.distributed_optimizer:
            # megatron runs both through the distributed optimizer's precision-aware path.
            raise ConfigError(f"{name} needs parallel.distributed_optimizer=true")
