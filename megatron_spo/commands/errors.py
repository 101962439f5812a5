"""User errors on the command line: one line ``error: <message>`` on stderr, exit code 2, no traceback.

A user error is a problem with what the user gave: the config, the data, the parallel layout against
the model, a model or checkpoint that is missing or unusable. Its message already names the key, file
or row to fix, and a traceback of internal frames would only bury it. Any other exception is a bug and
keeps its traceback.

Under torchrun every rank runs the same checks on the same input and raises the same error, so only
rank 0 prints it; every rank still exits with 2.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Tuple, Type

from megatron_spo.checkpoint_dir import IncompleteCheckpointError
from megatron_spo.config import ConfigError
from megatron_spo.data import DataError

EXIT_USER_ERROR = 2

# FileNotFoundError covers the checkpoint root without a complete checkpoint (NoCheckpointError) and
# a model directory without its files; LayoutError is a ConfigError.
USER_ERRORS: Tuple[Type[BaseException], ...] = (ConfigError, DataError, IncompleteCheckpointError, FileNotFoundError)
# Errors of modules that import torch: looked up only once their module is loaded (one that was never
# imported cannot have raised), so the command line does not import torch to catch them.
_LOADED_LATER = (("megatron_spo.megatron.model", "UnsupportedArchitectureError"),)


def user_error_types() -> Tuple[Type[BaseException], ...]:
    """The exception types reported as user errors, including those of modules loaded by now."""
    later = tuple(getattr(sys.modules[module], name) for module, name in _LOADED_LATER if module in sys.modules)
    return USER_ERRORS + later


def report_user_errors(command: Callable[[], int]) -> int:
    """Run ``command``; a user error is printed as one line on stderr (rank 0 only) and gives exit code 2."""
    try:
        return command()
    except user_error_types() as err:  # the tuple is evaluated when an exception is being matched
        if int(os.environ.get("RANK", "0")) == 0:
            print("error: " + str(err).replace("\n", " "), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
