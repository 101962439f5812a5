"""The ``megatron-spo`` command line: one sub-command per working feature.

Each feature module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int`` as the parser default. A sub-command is listed here only once it works.
A user error (config, data, layout, missing file) is printed as one line ``error: ...`` with exit
code 2 (:mod:`megatron_spo.commands.errors`); any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from megatron_spo.commands.errors import report_user_errors

# Modules that provide sub-commands, in the order `--help` lists them.
SUBCOMMAND_MODULES: List[str] = [
    "megatron_spo.demo",
    "megatron_spo.commands.train",
    "megatron_spo.commands.evaluate",
    "megatron_spo.commands.estimate_values",
    "megatron_spo.commands.convert",
    "megatron_spo.sandbox.cli",
    "megatron_spo.commands.serve",
    "megatron_spo.commands.preflight",
    "megatron_spo.config.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-spo",
        description="Megatron-core native RL post-training (SPO, GRPO, SegPO, VESPO).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return report_user_errors(lambda: int(args.func(args) or 0))


if __name__ == "__main__":
    sys.exit(main())
