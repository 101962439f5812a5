"""Validation inside a training run: avg@k / maj@k / pass@k on ``data.eval_paths`` (rank 0).

Uses the same rollout phase machinery as training and ``megatron-spo eval`` (the engine already
holds the current policy after the weight sync), with the validation sampling settings
``rollout.eval_temperature / eval_top_p / eval_top_k`` and ``rollout.eval_samples`` per problem.
"""

from __future__ import annotations

from typing import Any, Dict, List

from megatron_spo.config import Config
from megatron_spo.data import load_prompts
from megatron_spo.rollout.phase import RolloutPhase, with_sampling
from megatron_spo.trainer.benchmark import benchmark_names, default_ks, evaluate_benchmark


class Validator:
    """Loads the eval sets once; :meth:`run` returns ``{"eval/<name>/<metric>": value}``."""

    def __init__(self, cfg: Config, engine: Any, tokenizer: Any, context_len: Any = None) -> None:
        r = cfg.rollout
        self.k = r.eval_samples
        self.names = benchmark_names(cfg.data.eval_paths)
        self.sets = [load_prompts(p, cfg.data.prompt_key, cfg.data.answer_key, skip_bad_rows=cfg.data.skip_bad_rows)
                     for p in cfg.data.eval_paths]
        sampling = with_sampling(r, temperature=r.eval_temperature, top_p=r.eval_top_p, top_k=r.eval_top_k)
        self.phase = RolloutPhase(engine, tokenizer, sampling, reward=cfg.data.reward,
                                  max_prompt_len=cfg.data.max_prompt_len, skip_bad_rows=cfg.data.skip_bad_rows,
                                  context_len=context_len, seed=cfg.train.seed)

    def run(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        ks: List[int] = default_ks(self.k)
        for name, data in zip(self.names, self.sets):
            result = evaluate_benchmark(name, data, self.phase, self.k, ks, progress=False)
            for metric, value in result["metrics"].items():
                out[f"eval/{name}/{metric}"] = float(value)
        return out

    def close(self) -> None:
        self.phase.close()
