"""Prompt samplers: SPO's prioritized sampler (docs/algorithms.md §1.4) and a uniform sampler with the same interface.

Deviations from the reference (verl-recipe ``spo/spo_ray_trainer.py``, top of the ``fit()`` loop) and
choices:

1. **Thompson draw (off by default, a labelled deviation).** The reference's README says "Thompson
   sampling" but its weights use the posterior mean v̂ (docs/algorithms.md §6 item 2). ``thompson=True`` instead draws
   v ~ Beta(α, β) per tracked candidate (two Gamma draws from the sampler's own generator) and uses
   w = √(v(1 − v)) + ε. The default reproduces the reference.
2. **Batch larger than the pool** → draws *with* replacement (as the reference does); otherwise always
   without replacement. A batch larger than the number of candidates with positive weight (only
   untracked candidates have weight 0, since ε > 0) but not larger than the pool is a ``ValueError``
   naming both counts, rather than silently topping up with untracked prompts.
3. **All weights zero** (no candidate tracked) → the uniform distribution over the pool, as the
   reference does. The drawn prompts are then untracked: the caller must :meth:`ValueTracker.add` them
   (or treat it as an error) before reading baselines.
4. The random source is a ``torch.Generator`` owned by the sampler and saved in ``state_dict()``, so a
   resumed run draws the same prompts; the reference uses NumPy's global RNG.
5. A pool may hold the same key twice (a dataset with repeated prompts); the draw is over positions, so
   both copies can be drawn and the tracker then applies their updates in sequence.

Shapes: a candidate pool is a list of P prompt keys; ``sample`` returns ``[batch_size]`` int64
positions into that list. Weights and probabilities are float64 ``[P]``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import torch

from megatron_spo.algos.spo_tracker import ValueTracker

_F64 = torch.float64
_FORMAT_PRIORITIZED = "megatron_spo.PrioritizedSampler/1"
_FORMAT_UNIFORM = "megatron_spo.UniformSampler/1"


def _check_pool(pool_keys: Sequence[str], batch_size: int, fn: str) -> int:
    if isinstance(pool_keys, str):
        raise TypeError(f"{fn}: pool_keys must be a sequence of str, got a single str")
    if len(pool_keys) == 0:
        raise ValueError(f"{fn}: empty candidate pool")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{fn}: batch_size={batch_size!r} must be an int ≥ 1")
    return len(pool_keys)


class _SeededSampler:
    """The generator and its state handling shared by both samplers."""

    _format = ""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.draws = 0  # calls to sample(), for logging and state checks
        self.last_stats: Dict[str, float] = {}

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors and numbers only (``torch.load(..., weights_only=True)`` reads it)."""
        return {"format": self._format, "seed": self.seed, "draws": self.draws,
                "generator": self.generator.get_state(), **self._extra_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != self._format:
            raise ValueError(f"not a {type(self).__name__} state (format {state.get('format')!r}, expected {self._format!r})")
        for name, value in self._extra_state().items():
            if state.get(name) != value:
                raise ValueError(f"{type(self).__name__} config {name}: saved {state.get(name)!r} != current {value!r}")
        self.seed = int(state["seed"])
        self.draws = int(state["draws"])
        self.generator.set_state(state["generator"].clone())


class PrioritizedSampler(_SeededSampler):
    """Draw prompts with weight w = √(v̂(1 − v̂)) + ε from a candidate pool, without replacement.

    Args:
        tracker: the SPO value tracker whose α, β give v̂ (read at draw time, not copied).
        eps: exploration floor ε added to every tracked candidate's weight (0.05 in the reference).
        thompson: use v ~ Beta(α, β) instead of v̂ (a deviation; see the module docstring).
        seed: seed of the sampler's generator.
    """

    _format = _FORMAT_PRIORITIZED

    def __init__(self, tracker: ValueTracker, *, eps: float = 0.05, thompson: bool = False, seed: int = 0) -> None:
        if not (eps >= 0 and eps < float("inf")):
            raise ValueError(f"sampling eps={eps} must be finite and ≥ 0")
        super().__init__(seed)
        self.tracker = tracker
        self.eps = float(eps)
        self.thompson = bool(thompson)

    def _extra_state(self) -> Dict[str, Any]:
        return {"eps": self.eps, "thompson": self.thompson}

    def weights(self, pool_keys: Sequence[str]) -> torch.Tensor:
        """``[P]`` float64 weights; 0 for untracked keys. Consumes the generator when ``thompson``."""
        idx = self.tracker.index_of(pool_keys)
        tracked = idx >= 0
        w = torch.zeros(len(pool_keys), dtype=_F64)
        t_idx = idx[tracked]
        if t_idx.numel():
            if self.thompson:
                a, b = self.tracker.alpha[t_idx], self.tracker.beta[t_idx]
                # Beta(α, β) = X/(X + Y) with X ~ Γ(α), Y ~ Γ(β). torch._standard_gamma is the sampler that
                # torch.distributions uses internally; it is the only one that accepts our own generator.
                x = torch._standard_gamma(a, generator=self.generator)
                y = torch._standard_gamma(b, generator=self.generator)
                v = x / (x + y)
                # both Gamma draws can underflow to 0 for tiny α, β: fall back to the mean there
                v = torch.where(torch.isfinite(v), v, a / (a + b))
            else:
                v = self.tracker.values_at(t_idx)
            w[tracked] = torch.sqrt((v * (1.0 - v)).clamp_min(0.0)) + self.eps
        return w

    def probabilities(self, pool_keys: Sequence[str]) -> torch.Tensor:
        """``[P]`` float64 p = w/Σw, uniform if Σw = 0 (mean weights; with ``thompson`` this consumes a draw)."""
        return self._normalise(self.weights(pool_keys))

    @staticmethod
    def _normalise(w: torch.Tensor) -> torch.Tensor:
        total = w.sum()
        if total <= 0:
            return torch.full_like(w, 1.0 / w.numel())
        return w / total

    def sample(self, pool_keys: Sequence[str], batch_size: int) -> torch.Tensor:
        """``[batch_size]`` int64 distinct positions into ``pool_keys`` drawn with probability ∝ w.

        Positions repeat only when ``batch_size > len(pool_keys)`` (then drawn with replacement).
        Raises ``ValueError`` if ``batch_size`` exceeds the number of positive-weight candidates but not the pool.
        """
        pool = _check_pool(pool_keys, batch_size, "PrioritizedSampler.sample")
        w = self.weights(pool_keys)
        positive = int((w > 0).sum())
        fallback = positive == 0
        p = self._normalise(w)
        replace = batch_size > pool
        if not replace and not fallback and batch_size > positive:
            raise ValueError(
                f"PrioritizedSampler.sample: batch_size={batch_size} but only {positive} of the {pool} candidates "
                f"are tracked (weight > 0); grow the pool or add the {pool - positive} untracked prompts to the tracker"
            )
        out = torch.multinomial(p, batch_size, replacement=replace, generator=self.generator)
        self.draws += 1
        self.last_stats = {
            "sampler/pool_size": float(pool),
            "sampler/untracked": float(pool - positive),
            "sampler/uniform_fallback": float(fallback),
            "sampler/with_replacement": float(replace),
            "sampler/weight_mean": float(w.mean()),
        }
        return out


class UniformSampler(_SeededSampler):
    """Uniform draw from the candidate pool, without replacement unless the batch exceeds the pool.

    The sampler for GRPO and for SPO without a prior. Same ``sample``/``state_dict`` interface as
    :class:`PrioritizedSampler`; keys are not looked up.
    """

    _format = _FORMAT_UNIFORM

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__(seed)

    def sample(self, pool_keys: Sequence[str], batch_size: int) -> torch.Tensor:
        """``[batch_size]`` int64 positions into ``pool_keys``, distinct when ``batch_size ≤ len(pool_keys)``."""
        pool = _check_pool(pool_keys, batch_size, "UniformSampler.sample")
        replace = batch_size > pool
        if replace:
            out = torch.randint(pool, (batch_size,), generator=self.generator)
        else:
            out = torch.randperm(pool, generator=self.generator)[:batch_size]
        self.draws += 1
        self.last_stats = {"sampler/pool_size": float(pool), "sampler/with_replacement": float(replace)}
        return out
