"""Entry point of ``python -m megatron_spo.train`` (what torchrun launches on every rank).

The loop lives in ``megatron_spo.trainer.loop``; its command line in ``megatron_spo.commands.train``.
This module only starts the command line, so nothing imports it and it closes no import circle.
"""

import sys

from megatron_spo.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
