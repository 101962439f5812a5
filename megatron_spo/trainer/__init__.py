"""The trainer: the loop, its algorithm-step interface and families, and the parts they share.

- ``loop.py``: one training step and the main loop; ``setup.py``: building a run (``Run``).
- ``algorithm.py``: the algorithm-step interface; ``registry.py``: ``algo.advantage`` -> family.
- ``spo.py``: everything SPO does in a step; ``group.py``: GRPO / Dr.GRPO / RLOO.
- ``train_batch.py``, ``collectives.py``, ``checkpointing.py``, ``preemption.py``, ``prompt_stream.py``,
  ``metrics_log.py``, ``validation.py``, ``eval_metrics.py``, ``offline_values.py``: shared parts.
"""
