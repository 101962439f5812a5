"""The ``algo`` section of the config tree: the advantage estimator, SPO, GRPO, SegPO and the policy loss.

Each section's ``check`` holds its range and cross-field rules (types are enforced while loading);
``key`` is the dotted name of the section, for the error messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from megatron_spo.config.declare import key
from megatron_spo.config.errors import ConfigError, at_least, in_range, positive


@dataclass
class SPOConfig:
    """``algo.spo``: the per-prompt value tracker (Beta posterior, KL-adaptive forgetting) and its sampler."""

    offline_values: Optional[str] = key(
        None, "JSON file {prompt_key: [scores]} from `megatron-spo estimate-values` for the prior; null: uninformative")
    offline_n: int = key(8, "scores per prompt used for the offline prior (0: alpha = beta = 0.5)")
    rho_type: Literal["kl", "constant"] = key("kl", "forgetting factor rho: from the policy's KL drift or rho_constant")
    rho_mode: Literal["exact", "accumulated"] = key(
        "exact", "kl drift: exact re-scores the prompt's last stored response; accumulated keeps a drift ledger")
    rho_min: float = key(0.875, "lower clip of rho; also sets the prior's sample size 1 / (1 - rho_min)")
    rho_max: float = key(0.96, "upper clip of rho (reached at zero KL drift)")
    rho_constant: float = key(0.875, "rho of every prompt when rho_type=constant")
    d_half: float = key(0.06, "KL distance that halves the tracker's memory: rho = 2^(-D / d_half), clipped")
    sampling_eps: float = key(0.05, "exploration floor added to every prompt's weight sqrt(v (1 - v))")
    thompson: bool = key(False, "sample weights from v ~ Beta(alpha, beta) instead of its mean (a deviation)")
    pool_size: int = key(14000, "candidate prompts drawn from the dataset each step for the prioritized sampler")

    def check(self, key: str) -> None:
        at_least(f"{key}.offline_n", self.offline_n, 0)
        in_range(f"{key}.rho_min", self.rho_min, 0.0, 1.0, low_open=True)
        in_range(f"{key}.rho_max", self.rho_max, 0.0, 1.0, low_open=True)
        in_range(f"{key}.rho_constant", self.rho_constant, 0.0, 1.0, low_open=True)
        if self.rho_min > self.rho_max:
            raise ConfigError(f"{key}.rho_min ({self.rho_min}) must not exceed {key}.rho_max ({self.rho_max})")
        in_range(f"{key}.d_half", self.d_half, 0.0, None, low_open=True)
        at_least(f"{key}.sampling_eps", self.sampling_eps, 0.0)
        positive(f"{key}.pool_size", self.pool_size)


@dataclass
class GRPOConfig:
    """``algo.grpo``: the group estimators (grpo, dr_grpo, rloo)."""

    n: int = key(8, "responses per prompt of the group estimators (spo always draws one)")
    norm_by_std: bool = key(True, "divide group-centred rewards by the group's standard deviation")

    def check(self, key: str) -> None:
        positive(f"{key}.n", self.n)


@dataclass
class SegmentConfig:
    """``algo.segment``: SegPO's SPO-chain (cut points, Monte-Carlo prefix values, probability mask) and SPO-tree."""

    prob_threshold: float = key(
        0.9, "spo_chain: tokens sampled with probability below this are cut candidates and the only ones trained")
    cutpoint_interval: int = key(5, "spo_chain: every k-th low-probability token of a response is a cut point")
    mc_rollouts: int = key(9, "spo_chain: continuations sampled from each cut's prefix; their mean reward is its value")
    branching: List[int] = key([6, 6, 6], "spo_tree: children of each node at depth 0, 1, ... (tree depth = list length)")
    segment_len: int = key(30, "spo_tree: new tokens per segment above the last depth (the last runs to the end)")
    tree_advantage: Literal["rloo", "grpo"] = key(
        "rloo", "spo_tree: edge advantage V(child) - V(parent); grpo divides it by the siblings' std")

    def check(self, key: str) -> None:
        in_range(f"{key}.prob_threshold", self.prob_threshold, 0.0, 1.0, low_open=True)
        positive(f"{key}.cutpoint_interval", self.cutpoint_interval)
        positive(f"{key}.mc_rollouts", self.mc_rollouts)
        if not self.branching:
            raise ConfigError(f"{key}.branching must list at least one depth's branching, got []")
        for d, b in enumerate(self.branching):
            positive(f"{key}.branching[{d}]", b)
        positive(f"{key}.segment_len", self.segment_len)


@dataclass
class LossConfig:
    """``algo.loss``: the registered policy loss, its aggregation and the optional KL / entropy terms."""

    name: Literal["ppo", "gspo", "vespo"] = key("ppo", "policy loss: token-level PPO clip, sequence-level GSPO, VESPO")
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = key(
        "token-mean", "how per-token losses are reduced to the batch loss")
    clip_low: float = key(0.2, "ppo: lower clip epsilon of the importance ratio (1 - clip_low)")
    clip_high: float = key(0.28, "ppo: upper clip epsilon of the importance ratio (1 + clip_high)")
    dual_clip: Optional[float] = key(10.0, "ppo: dual-clip cap c (> 1) for negative advantages; null disables it")
    gspo_clip_low: float = key(3e-4, "gspo: lower clip epsilon of the sequence importance ratio")
    gspo_clip_high: float = key(4e-4, "gspo: upper clip epsilon of the sequence importance ratio")
    vespo_k_pos: float = key(2.0, "vespo: shape k of the soft weight for advantages >= 0")
    vespo_lambda_pos: float = key(3.0, "vespo: rate lambda of the soft weight for advantages >= 0")
    vespo_k_neg: float = key(3.0, "vespo: shape k of the soft weight for advantages < 0")
    vespo_lambda_neg: float = key(2.0, "vespo: rate lambda of the soft weight for advantages < 0")
    tis_cap: Optional[float] = key(
        None, "truncated importance-sampling cap C (>= 1) for the engine / trainer log-prob mismatch; null: off")
    kl_coef: float = key(0.0, "weight of the KL penalty against a frozen reference policy, the initial weights (0: off)")
    kl_estimator: Literal["k1", "k3"] = key("k3", "estimator of the KL penalty (with kl_coef > 0)")
    entropy_coef: float = key(0.0, "weight of the entropy bonus (0: off)")

    def check(self, key: str) -> None:
        for name in ("clip_low", "clip_high", "gspo_clip_low", "gspo_clip_high"):
            in_range(f"{key}.{name}", getattr(self, name), 0.0, 1.0, low_open=True)
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ConfigError(f"{key}.dual_clip must be > 1 (or null to disable), got {self.dual_clip}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            in_range(f"{key}.{name}", getattr(self, name), 0.0, None, low_open=True)
        if self.tis_cap is not None and self.tis_cap < 1.0:
            raise ConfigError(f"{key}.tis_cap must be >= 1 (or null to disable), got {self.tis_cap}")
        at_least(f"{key}.kl_coef", self.kl_coef, 0.0)
        at_least(f"{key}.entropy_coef", self.entropy_coef, 0.0)

    def loss_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of the registered loss ``name`` (see megatron_spo/algos/losses.py, vespo.py)."""
        if self.name == "ppo":
            return dict(clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip, tis_cap=self.tis_cap)
        if self.name == "gspo":
            return dict(clip_low=self.gspo_clip_low, clip_high=self.gspo_clip_high, tis_cap=self.tis_cap)
        return dict(k_pos=self.vespo_k_pos, lambda_pos=self.vespo_lambda_pos, k_neg=self.vespo_k_neg,
                    lambda_neg=self.vespo_lambda_neg, tis_cap=self.tis_cap)


@dataclass
class AlgoConfig:
    """``algo``: which advantage estimator, and the settings of each algorithm."""

    advantage: Literal["spo", "grpo", "dr_grpo", "rloo", "spo_chain", "spo_tree"] = key(
        "spo", "advantage estimator; spo uses the per-prompt value tracker and one response per prompt; "
        "spo_chain values response segments by continuations, spo_tree by tree rollouts (algo.segment)")
    spo: SPOConfig = field(default_factory=SPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def check(self, key: str) -> None:
        pass
