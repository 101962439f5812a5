"""``megatron-spo config``: print the resolved, validated config, or list every key."""

from __future__ import annotations

import argparse

from megatron_spo.config.errors import ConfigError
from megatron_spo.config.keys import describe
from megatron_spo.config.loading import load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--config`` / ``--set`` pair every run-type sub-command takes."""
    parser.add_argument("--config", help="YAML config file (see examples/); defaults apply to missing keys")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable, e.g. --set algo.spo.rho_min=0.9")


def _show(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}")
        return 2
    print(cfg.to_yaml(), end="")
    if args.save:
        for path in cfg.save(args.save):
            print(f"# wrote {path}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    print(describe())
    return 0


_KEYS_HELP = """Print every config key, one a line:

  section.key: type = default  # description

Set a key in a YAML file under its section (see examples/), or with --set section.key=value
(`config show` and the run-type sub-commands take --set)."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("config", help="show the resolved config or list every key")
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="validate and print the config after overrides")
    add_config_arguments(show)
    show.add_argument("--save", metavar="DIR", help="also write config.yaml and config.json into DIR")
    show.set_defaults(func=_show)
    keys = sub.add_parser("keys", help="list every key with its type, default and description",
                          description=_KEYS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    keys.set_defaults(func=_keys)
