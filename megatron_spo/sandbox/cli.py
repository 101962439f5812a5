"""``megatron-spo sandbox serve``: start the SandboxFusion-compatible sandbox server.

Also runnable on its own: ``python -m megatron_spo.sandbox.cli serve --port 8080``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from megatron_spo.sandbox import api


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``sandbox`` (with its ``serve`` action) to the ``megatron-spo`` sub-commands."""
    d = api.Limits()
    parser = subparsers.add_parser("sandbox", help="isolated SandboxFusion-compatible code execution server")
    actions = parser.add_subparsers(dest="sandbox_command", metavar="ACTION")
    serve = actions.add_parser("serve", help="serve /run_code and /health over HTTP")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--concurrency", type=_positive_int, default=os.cpu_count() or 1,
                       help="runs at the same time; the rest queue (default: CPU count)")
    serve.add_argument("--max-queue", type=_positive_int, default=4096,
                       help="requests allowed to wait for a slot; more get HTTP 503")
    serve.add_argument("--unsafe-no-isolation", action="store_true",
                       help="run without bubblewrap (no network/filesystem isolation). Trusted code only.")
    serve.add_argument("--python", default="/usr/bin/python3", help="interpreter inside the sandbox")
    serve.add_argument("--ro-bind", action="append", default=[], metavar="PATH",
                       help="extra host path visible read-only in the sandbox (e.g. a venv); repeatable")
    serve.add_argument("--uid-base", type=int, default=61000,
                       help="slot s runs as uid/gid UID_BASE+s; these uids must be unused on the host")
    serve.add_argument("--no-cgroup", action="store_true", help="do not use cgroup v1 pids/memory limits")
    serve.add_argument("--no-warm-pool", action="store_true",
                       help="start each sandbox when its request arrives instead of ahead of it (slower answers, "
                            "no idle sandbox per slot)")
    serve.add_argument("--default-memory-mb", type=_positive_int, default=d.default_memory_mb,
                       help="memory limit when a request omits memory_limit_MB or sends <= 0")
    serve.add_argument("--max-memory-mb", type=_positive_int, default=d.max_memory_mb)
    serve.add_argument("--default-run-timeout", type=float, default=d.default_run_timeout, help="seconds")
    serve.add_argument("--max-run-timeout", type=float, default=d.max_run_timeout, help="seconds")
    serve.add_argument("--max-output-bytes", type=_positive_int, default=d.max_output_bytes,
                       help="kept per stream; the rest is drained and dropped")
    serve.add_argument("--max-procs", type=_positive_int, default=d.max_procs,
                       help="processes per run (RLIMIT_NPROC of the slot uid, cgroup pids.max)")
    serve.add_argument("--workdir-mb", type=_positive_int, default=d.workdir_bytes >> 20,
                       help="size of the private tmpfs work dir")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=run_serve)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    return parser


# Fields of api.Limits / ServerConfig whose option (its argparse dest) has the same name and value.
_LIMITS_FROM_ARGS = (
    "default_run_timeout", "max_run_timeout", "default_memory_mb", "max_memory_mb", "max_output_bytes", "max_procs")
_SERVER_FROM_ARGS = ("host", "port", "concurrency", "max_queue", "unsafe_no_isolation", "python", "uid_base")


def _same_named(args: argparse.Namespace, names: Tuple[str, ...]) -> Dict[str, Any]:
    """``{name: args.<name>}`` for each of ``names``."""
    return {name: getattr(args, name) for name in names}


def run_serve(args: argparse.Namespace) -> int:
    from megatron_spo.sandbox.server import ServerConfig, serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.default_memory_mb > args.max_memory_mb:
        print(f"--default-memory-mb {args.default_memory_mb} exceeds --max-memory-mb {args.max_memory_mb}")
        return 2
    limits = api.Limits(**_same_named(args, _LIMITS_FROM_ARGS), workdir_bytes=args.workdir_mb << 20)
    cfg = ServerConfig(
        **_same_named(args, _SERVER_FROM_ARGS),
        ro_binds=tuple(args.ro_bind),
        use_cgroup=not args.no_cgroup,
        warm_pool=not args.no_warm_pool,
        limits=limits,
    )
    return serve(cfg)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_spo.sandbox.cli")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    # Standalone use: "serve ..." is short for "sandbox serve ...".
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["sandbox"]:
        argv = ["sandbox", *argv]
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
