"""``megatron-spo serve``: the embedded CPU engine as an SGLang/vLLM-compatible HTTP server.

The server itself (flags, LISTENING line, routes) is :mod:`megatron_spo.rollout.embedded.server`.
"""

from __future__ import annotations

from megatron_spo.rollout.embedded.server import add_arguments, run


def register(subparsers) -> None:
    """``megatron-spo serve``: the embedded engine as an SGLang/vLLM-compatible HTTP server."""
    p = subparsers.add_parser("serve", help="serve a model with the embedded CPU engine over HTTP")
    add_arguments(p)
    p.set_defaults(func=run)
