"""Build the rollout engine a config asks for: the embedded CPU engine, or clients of server URLs.

- ``rollout.engine=embedded``: an :class:`~megatron_spo.rollout.embedded.EmbeddedEngine` over
  ``model.path`` (context window: the smaller of the model's positions and ``model.max_seq_len``).
- ``rollout.engine=sglang|vllm`` with ``rollout.urls``: one HTTP client per URL; several URLs are
  served by :class:`LeastLoadedEngines`, which sends each request to the client with the fewest
  requests in flight. Every URL must answer ``GET /health`` first, or a clear error names it
  (no hang: the health probe has a short timeout and no retries).

``rollout.ray_servers`` (Ray-placed, supervised servers) belongs to the rollout fleet module, which
does not exist yet; asking for it here is a clear error. Restarting dead servers and re-routing
their in-flight requests are also the fleet's job: here a failed request raises ``EngineError`` and
the scheduler retries it (it may land on another URL).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import List, Optional, Sequence

from megatron_spo.config import Config, ConfigError
from megatron_spo.rollout.engine import Engine, EngineError, GenerateResult, SamplingParams, WeightSource


class LeastLoadedEngines:
    """Several engine clients behind the Engine protocol; each request goes to the least-loaded one.

    Ties go to the client listed first. ``weight_version`` is the oldest of the clients' versions
    (what the staleness bound must assume); control calls go to every client.
    """

    name = "least_loaded"

    def __init__(self, engines: Sequence[Engine]):
        if not engines:
            raise ValueError("LeastLoadedEngines needs at least one engine")
        self.engines = list(engines)
        self.in_flight = [0] * len(self.engines)
        self.requests = [0] * len(self.engines)

    def _pick(self) -> int:
        return min(range(len(self.engines)), key=lambda i: self.in_flight[i])

    async def agenerate(self, prompt: Sequence[int], sampling: SamplingParams,
                        request_id: Optional[str] = None) -> GenerateResult:
        i = self._pick()
        self.in_flight[i] += 1
        self.requests[i] += 1
        try:
            return await self.engines[i].agenerate(prompt, sampling, request_id)
        finally:
            self.in_flight[i] -= 1

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> List[GenerateResult]:
        """Send each prompt to the least-loaded client (blocking; not from inside an event loop), results in order."""

        async def go():
            return await asyncio.gather(*(self.agenerate(p, sampling) for p in prompts))

        return list(asyncio.run(go()))

    def update_weights(self, source: WeightSource, version: int) -> None:
        buckets = source if isinstance(source, (str, os.PathLike)) else [list(b) for b in source]
        for e in self.engines:
            e.update_weights(buckets, version)

    def pause(self) -> None:
        for e in self.engines:
            e.pause()

    def resume(self) -> None:
        for e in self.engines:
            e.resume()

    def health(self) -> bool:
        return all(e.health() for e in self.engines)

    @property
    def weight_version(self) -> int:
        return min(int(e.weight_version) for e in self.engines)

    def close(self) -> None:
        for e in self.engines:
            close = getattr(e, "close", None)
            if close is not None:
                close()


def build_engine(cfg: Config, *, check_health: bool = True) -> Engine:
    """The engine (or least-loaded set of clients) ``cfg.rollout`` describes.

    Raises:
        ConfigError: ``model.path`` missing for the embedded engine, or ``rollout.ray_servers`` asked for.
        EngineError: a server URL does not answer ``GET /health`` (the message names the URL).
    """
    r = cfg.rollout
    if r.engine == "embedded":
        path = _model_dir(cfg)
        from megatron_spo.rollout.embedded import EmbeddedEngine

        engine = EmbeddedEngine(str(path), seed=cfg.train.seed)
        engine.max_context = min(engine.max_context, cfg.model.max_seq_len)
        return engine
    if r.ray_servers:
        raise ConfigError("rollout.ray_servers needs the Ray rollout fleet (megatron_spo/rollout/fleet.py), which is "
                          "not available yet; start servers yourself and pass rollout.urls instead")
    if r.engine == "sglang":
        from megatron_spo.rollout.sglang_client import SGLangClient as client_cls
    else:
        from megatron_spo.rollout.vllm_client import VLLMClient as client_cls
    clients = [client_cls(url, timeout_s=r.request_timeout_s) for url in r.urls]
    if check_health:
        dead = [c.url for c in clients if not c.health()]
        if dead:
            for c in clients:
                c.close()
            raise EngineError(f"rollout server(s) not reachable (GET /health failed): {', '.join(dead)}; start them "
                              f"(e.g. slurm/rollout.sbatch) or fix rollout.urls")
    return clients[0] if len(clients) == 1 else LeastLoadedEngines(clients)


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


def close_engine(engine: Engine) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def _model_dir(cfg: Config) -> Path:
    if not cfg.model.path:
        raise ConfigError("model.path is not set; give the HF model directory (config, weights, tokenizer)")
    path = Path(cfg.model.path)
    if not path.is_dir():
        raise ConfigError(f"model.path {str(path)!r} is not a directory")
    return path


# ---------------------------------------------------------------------------------------------
# The rollout settings the eval / estimate-values commands share.

#: Validation sampling of the SPO recipe (spec algorithms.md §1.3, §1.10): T=0.6, top_p=0.95, top_k=20.
VALIDATION_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}


def add_sampling_arguments(parser, default_reward: str = "spo_strict_boxed") -> None:
    """``--temperature/--top-p/--top-k`` (validation defaults), ``--max-response-len``, ``--reward``."""
    parser.add_argument("--temperature", type=float, default=VALIDATION_SAMPLING["temperature"],
                        help="sampling temperature (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=VALIDATION_SAMPLING["top_p"], help="default %(default)s")
    parser.add_argument("--top-k", type=int, default=VALIDATION_SAMPLING["top_k"],
                        help="default %(default)s; <= 0 disables it")
    parser.add_argument("--max-response-len", type=int, default=None,
                        help="token budget of a response (default rollout.max_response_len)")
    parser.add_argument("--reward", default=default_reward,
                        help="reward function: a registered name (spo_strict_boxed, math_verify) or "
                             "'package.module:function' (default %(default)s)")
