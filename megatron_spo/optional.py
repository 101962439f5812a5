"""Lazy imports of optional extras with a clear message naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# module name -> the pip extra of this project that provides it
EXTRAS = {
    "ray": "ray",
    "sglang": "sglang",
    "vllm": "vllm",
    "transformer_engine": "gpu",
    "modelopt": "gpu",
    "gguf": "smollm2",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ImportError saying which extra provides it and what needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        how = f"pip install 'megatron-spo[{EXTRAS[top]}]'" if top in EXTRAS else f"pip install {top}"
        raise ImportError(f"{purpose} needs the optional package {module!r}, which is not installed: {how}") from err
