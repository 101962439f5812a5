"""Command line of the trainer: ``python -m megatron_spo.train`` (under torchrun) and ``megatron-spo train``."""

from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from megatron_spo.commands.errors import report_user_errors
from megatron_spo.config import load_config
from megatron_spo.config.cli import add_config_arguments

DESCRIPTION = ("Train a policy with SPO / GRPO: rollouts on the engines, updates on the Megatron actor. "
               "Launch several processes with torchrun --nproc-per-node G -m megatron_spo.train ...")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest complete checkpoint in io.run_dir), 'none', or a checkpoint dir "
                             "(default: io.resume, which is 'auto')")


def run(args: argparse.Namespace) -> int:
    """Train; a user error (config, data, layout, missing file) is one line on stderr and exit code 2."""
    return report_user_errors(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from megatron_spo.trainer.loop import train

    overrides = list(args.overrides) + ([f"io.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every parameter bucket
    return train(cfg)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_spo.train", description=DESCRIPTION)
    add_train_arguments(parser)
    return run(parser.parse_args(argv))


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a policy (single process; use torchrun for several)",
                                   description=DESCRIPTION)
    add_train_arguments(parser)
    parser.set_defaults(func=run)
