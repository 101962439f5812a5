"""Algorithm library: pure tensor functions and small state objects, one file per algorithm.

Importing this package imports every algorithm module so that the registries are complete.
"""

from megatron_spo.algos.registry import (  # noqa: F401
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    get_advantage,
    get_loss,
    register_advantage,
    register_loss,
)

# Every algorithm module, imported so that its registrations run.
from megatron_spo.algos import grpo, kl, losses, segment_chain, segment_tree, spo_advantage, vespo  # noqa: E402,F401
