"""Shared pytest setup: marker handling and thread limits for a 2-core machine."""

from __future__ import annotations

import os

import pytest

# Two cores are shared by the test process and the gloo workers it spawns; more threads only thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
