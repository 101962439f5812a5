"""One typed configuration tree for a run: model, parallel, rollout, algo, optim, data, train, io.

Loaded from YAML, overridden with dotted ``key=value`` pairs (``--set algo.spo.rho_min=0.9``),
validated with errors that name the key and the allowed values, printed, and saved as YAML and
JSON in the run directory.

- ``schema.py`` / ``algo_schema.py``: the dataclass tree, each key with its default and description;
- ``loading.py``: YAML file + overrides -> a typed :class:`Config`; ``yaml_io.py``: files on disk;
- ``checks.py``: validation after building; ``errors.py``: :class:`ConfigError` and range checks;
- ``keys.py``: the key listing; ``cli.py``: the ``megatron-spo config`` sub-command.
"""

from megatron_spo.config.algo_schema import AlgoConfig, GRPOConfig, LossConfig, SPOConfig
from megatron_spo.config.checks import validate
from megatron_spo.config.errors import ConfigError
from megatron_spo.config.keys import KeyInfo, describe, iter_keys
from megatron_spo.config.loading import load_config
from megatron_spo.config.schema import (RECOMPUTE_MODULES, Config, DataConfig, IOConfig, ModelConfig, OptimConfig,
                                        ParallelConfig, RolloutConfig, TrainConfig)

__all__ = [
    "AlgoConfig", "Config", "ConfigError", "DataConfig", "GRPOConfig", "IOConfig", "KeyInfo", "LossConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "RECOMPUTE_MODULES", "RolloutConfig", "SPOConfig",
    "TrainConfig", "describe", "iter_keys", "load_config", "validate",
]
