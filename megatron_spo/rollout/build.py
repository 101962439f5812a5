"""Build the rollout engine a config asks for: the embedded CPU engine, or a fleet of servers.

- ``rollout.engine=embedded``: an :class:`~megatron_spo.rollout.embedded.engine.EmbeddedEngine` over
  ``model.path`` (context window: the smaller of the model's positions and ``model.max_seq_len``).
- ``rollout.engine=sglang|vllm`` with ``rollout.urls``: a :class:`~megatron_spo.rollout.fleet.Fleet`
  of HTTP clients (least-loaded routing, retries on another endpoint, health checks). Every URL
  must answer ``GET /health`` first, or a clear error names it (no hang: the probe has a short
  timeout and no retries).
- ``rollout.ray_servers=N``: ``Fleet.ray`` (N servers placed and supervised by Ray; ``ray`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_spo.config import Config, ConfigError, RolloutConfig
from megatron_spo.rollout.engine import Engine, EngineError


def build_engine(cfg: Config, *, check_health: bool = True) -> Engine:
    """The engine (embedded, or a fleet of servers) ``cfg.rollout`` describes; its owner closes it.

    Raises:
        ConfigError: ``model.path`` missing or not a directory, or Ray missing for ``rollout.ray_servers``.
        EngineError: a server URL does not answer ``GET /health`` (the message names the URL).
    """
    r = cfg.rollout
    if r.engine == "embedded":
        path = _model_dir(cfg)
        from megatron_spo.rollout.embedded.engine import EmbeddedEngine

        engine = EmbeddedEngine(str(path), seed=cfg.train.seed)
        engine.max_context = min(engine.max_context, cfg.model.max_seq_len)
        return engine
    from megatron_spo.rollout.fleet import Fleet
    from megatron_spo.rollout.launchers import make_client

    client_kwargs = {"timeout_s": r.request_timeout_s}
    if r.ray_servers:
        try:
            return Fleet.ray(str(_model_dir(cfg)), r.ray_servers, kind=r.engine, client_kwargs=client_kwargs)
        except ImportError as err:
            raise ConfigError(f"rollout.ray_servers={r.ray_servers} needs Ray (pip install 'megatron-spo[ray]'): "
                              f"{err}") from err
    clients = [make_client(r.engine, url, **client_kwargs) for url in r.urls]
    if check_health:
        dead = [c.url for c in clients if not c.health()]
        if dead:
            for c in clients:
                c.close()
            raise EngineError(f"rollout server(s) not reachable (GET /health failed): {', '.join(dead)}; start them "
                              f"(e.g. slurm/rollout.sbatch) or fix rollout.urls")
    return Fleet(clients)


def fleet_from_config(rollout, model_dir: str, **kwargs):
    """The fleet a run's ``RolloutConfig`` asks for (``engine``, ``urls``, ``ray_servers``,
    ``request_timeout_s``): the embedded engine in process, the user's URLs, or Ray-placed servers.

    ``model_dir`` is the HF directory the embedded engine / Ray servers load.
    """
    from megatron_spo.rollout.fleet import Fleet

    client_kwargs = {"timeout_s": float(rollout.request_timeout_s)}
    if rollout.engine == "embedded":
        from megatron_spo.rollout.embedded.engine import EmbeddedEngine

        return Fleet([EmbeddedEngine(model_dir)], health_interval_s=0, **kwargs)
    if rollout.ray_servers > 0:
        # Ray-placed servers run the embedded engine's HTTP server, which speaks both protocols.
        return Fleet.ray(model_dir, rollout.ray_servers, kind=rollout.engine, client_kwargs=client_kwargs, **kwargs)
    return Fleet.from_urls(list(rollout.urls), kind=rollout.engine, client_kwargs=client_kwargs, **kwargs)


def load_tokenizer(cfg: Config, engine: Optional[Engine] = None):
    """The policy tokenizer: the embedded engine's, else the one in ``model.path``.

    Raises:
        ConfigError: no tokenizer is available (``model.path`` unset or without tokenizer files).
    """
    tok = getattr(engine, "tokenizer", None)
    if tok is not None:
        return tok
    path = _model_dir(cfg)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(f"model.path {str(path)!r} has no tokenizer (tokenizer.json / tokenizer_config.json); "
                          "prompts are tokenised here and sent to the engines as token ids")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def context_len(engine: Engine) -> Optional[int]:
    """The engine's context window in tokens when it is known locally (the embedded engine), else None."""
    value = getattr(engine, "max_context", None)
    return int(value) if value is not None else None


def close_rollout(engine: Optional[Engine], *phases) -> None:
    """Close rollout phases (their event loops and sandbox sessions; None is skipped), then the engine."""
    for phase in phases:
        if phase is not None:
            phase.close()
    if engine is not None:
        close_engine(engine)


def close_engine(engine: Engine) -> None:
    """Close an engine from :func:`build_engine`, and the URL clients of a fleet (the fleet leaves them open)."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()
    if getattr(engine, "launcher", None) is not None:
        return  # a supervised fleet closes its own clients
    for ep in getattr(engine, "endpoints", []):
        client_close = getattr(ep.engine, "close", None)
        if client_close is not None and getattr(ep.engine, "url", None):
            client_close()


def _model_dir(cfg: Config) -> Path:
    if not cfg.model.path:
        raise ConfigError("model.path is not set; give the HF model directory (config, weights, tokenizer)")
    path = Path(cfg.model.path)
    if not path.is_dir():
        raise ConfigError(f"model.path {str(path)!r} is not a directory")
    return path


# ---------------------------------------------------------------------------------------------
# The rollout settings the eval / estimate-values commands share.


def add_sampling_arguments(parser) -> None:
    """``--temperature/--top-p/--top-k``, ``--max-response-len`` and ``--reward`` (defaults from the config)."""
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (default rollout.eval_temperature = 0.6)")
    parser.add_argument("--top-p", type=float, default=None, help="default rollout.eval_top_p = 0.95")
    parser.add_argument("--top-k", type=int, default=None, help="default rollout.eval_top_k = 20; <= 0 disables it")
    parser.add_argument("--max-response-len", type=int, default=None,
                        help="token budget of a response (default rollout.max_response_len)")
    parser.add_argument("--reward", default=None,
                        help="reward function: a registered name (spo_strict_boxed, math_verify) or "
                             "'package.module:function' (default data.reward)")


def sampling_from_args(cfg: Config, args) -> RolloutConfig:
    """``cfg.rollout`` with the validation sampling of the SPO recipe (docs/algorithms.md §1.3, §1.10: T=0.6,
    top_p=0.95, top_k=20, from ``rollout.eval_*``), each overridable by its command-line flag."""
    from megatron_spo.rollout.phase import with_sampling

    r = cfg.rollout

    def pick(flag, default):
        return default if flag is None else flag

    return with_sampling(r, temperature=pick(args.temperature, r.eval_temperature), top_p=pick(args.top_p, r.eval_top_p),
                         top_k=pick(args.top_k, r.eval_top_k), max_response_len=args.max_response_len)
