"""Sub-commands of ``megatron-spo``: each module registers one parser (see ``megatron_spo.cli``)."""
