"""Which algorithm family implements each ``algo.advantage`` value (the loop's only way to pick one).

A family is a subclass of :class:`megatron_spo.trainer.algorithm.AlgorithmStep` listing the names it
implements in ``names``; add it to :data:`FAMILIES` and every name becomes a valid ``algo.advantage``.
"""

from __future__ import annotations

from typing import Dict, Type

from megatron_spo.config import Config, ConfigError
from megatron_spo.data import PromptDataset
from megatron_spo.trainer.algorithm import AlgorithmStep
from megatron_spo.trainer.group import GroupStep
from megatron_spo.trainer.prompt_stream import PromptStream
from megatron_spo.trainer.segment_chain import SegmentChainStep
from megatron_spo.trainer.segment_tree import SegmentTreeStep
from megatron_spo.trainer.spo import SPOStep

FAMILIES = (SPOStep, GroupStep, SegmentChainStep, SegmentTreeStep)

ALGORITHMS: Dict[str, Type[AlgorithmStep]] = {name: family for family in FAMILIES for name in family.names}


def algorithm_class(cfg: Config) -> Type[AlgorithmStep]:
    """The family class for ``cfg.algo.advantage``; an unknown name is a ``ConfigError`` naming the key."""
    try:
        return ALGORITHMS[cfg.algo.advantage]
    except KeyError:
        raise ConfigError(f"algo.advantage={cfg.algo.advantage!r} has no trainer step; "
                          f"choose one of {sorted(ALGORITHMS)}") from None


def build_algorithm(cfg: Config, dataset: PromptDataset, stream: PromptStream) -> AlgorithmStep:
    """The family object that runs ``cfg.algo.advantage`` for this run."""
    return algorithm_class(cfg)(cfg, dataset, stream)
