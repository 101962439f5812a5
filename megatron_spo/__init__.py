"""megatron_spo: Megatron-core native RL post-training (SPO, GRPO, SegPO, VESPO)."""

__version__ = "0.1.0"
