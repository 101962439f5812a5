"""Guarded imports of megatron-core and its optional GPU companions.

A bare ``pip install transformer-engine`` on a machine without CUDA installs an empty meta-package;
``import transformer_engine`` then raises RuntimeError (not ImportError), and megatron-core, which
only catches ImportError, fails to import at all. We detect that case and say what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class BrokenTransformerEngineError(RuntimeError):
    """Raised when the empty ``transformer-engine`` meta-package is installed without its kernels."""


def check_transformer_engine() -> bool:
    """Return True if Transformer Engine imports and is usable, False if it is simply absent.

    Raises:
        BrokenTransformerEngineError: TE is installed but cannot be imported (the meta-package case).
    """
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        importlib.import_module("transformer_engine")
    except ImportError:
        return False
    except RuntimeError as err:  # the meta package raises RuntimeError on import
        raise BrokenTransformerEngineError(
            "transformer-engine is installed but cannot be imported: " f"{err}\n"
            "This is the empty `transformer-engine` meta-package, which breaks `import megatron.core`. "
            "On a CPU machine run `pip uninstall -y transformer-engine`; on a CUDA machine install "
            "`pip install 'megatron-spo[gpu]'` (transformer-engine[pytorch])."
        ) from err
    return True


def megatron_core() -> ModuleType:
    """Import and return ``megatron.core`` after checking for a broken Transformer Engine."""
    check_transformer_engine()
    return importlib.import_module("megatron.core")
