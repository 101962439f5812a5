"""KL penalty against the reference policy (issue 14, item 6): the frozen reference of
``megatron_spo.megatron.reference`` and a trainer run with ``algo.loss.kl_coef > 0``.

1. The reference scores the initial weights: its log-probs equal a plain transformers forward of
   ``model.path``, also after the actor has moved away from them.
2. The KL term of the actor's loss equals an independent computation: with advantages 0 (the policy
   term vanishes) the loss is ``kl_coef`` times the token mean over trained tokens of Schulman's k3,
   ``r − 1 − log r`` with ``log r = log π_ref − log π_θ``, written here from scratch in float64.
3. A 5-step single-process run with ``kl_coef=0.1`` (reward: the parity of the response's length,
   mixed from the first step) trains: finite losses, ``actor/kl_ref_k3`` 0 at the
   start (the policy is the reference) and > 0 from step 1 on.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_spo.megatron.launch import run_distributed
from megatron_spo.models.tiny import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
KL_COEF = 0.5


def parity_reward(response: str, ground_truth, **info) -> float:
    """1 for an even-length response: mixed rewards from a random policy, so the first update moves it."""
    return float(len(response) % 2 == 0)


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([20, 9, 14, 17])
    ids = torch.randint(0, vocab, (4, 20), generator=g)
    ar = torch.arange(20).unsqueeze(0)
    mask = ((ar >= 3) & (ar < lengths.unsqueeze(1))).float()
    return {"input_ids": ids, "lengths": lengths, "loss_mask": mask}


def _hf_logp(model_dir: Path, batch) -> torch.Tensor:
    """``[B, T]`` float64 log-probs of each token under transformers' forward (position 0 = 0)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(batch["input_ids"]).logits.double()
    logp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    valid = torch.arange(batch["input_ids"].shape[1])[None, 1:] < batch["lengths"][:, None]
    return torch.cat([torch.zeros(len(logp), 1, dtype=logp.dtype), logp * valid], 1)


def _kl_worker(model_dir: Path):
    from megatron_spo.megatron.actor import LossSettings, MegatronActor
    from megatron_spo.megatron.export import load_hf_weights
    from megatron_spo.megatron.model import load_hf_config
    from megatron_spo.megatron.optimizer import OptimSettings
    from megatron_spo.megatron.parallel import ParallelSizes, initialize_parallel, teardown_parallel
    from megatron_spo.megatron.reference import ReferencePolicy

    initialize_parallel(ParallelSizes(), hf_config=load_hf_config(str(model_dir)), seed=3)
    actor = MegatronActor(str(model_dir), optim=OptimSettings(lr=0.05, optimizer="sgd"),
                          loss=LossSettings(name="ppo", kl_coef=KL_COEF), micro_batch_tokens=40)
    load_hf_weights(actor.model, str(model_dir))
    reference = ReferencePolicy(str(model_dir), micro_batch_tokens=40)
    batch = _batch(int(actor.hf_config["vocab_size"]))
    out = {"ref_before": reference.score(batch).double()}
    # Move the actor away from the initial weights: two policy-gradient steps with random advantages.
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        step = dict(batch, old_logp=actor.score(batch)["logp"], ref_logp=reference.score(batch),
                    advantages=torch.randn(4, 1, generator=g).expand(4, 20) * batch["loss_mask"])
        actor.train_step(step)
    out["ref_after"] = reference.score(batch).double()
    logp = actor.score(batch)["logp"]
    ref = reference.score(batch)
    metrics = actor.forward_backward(dict(batch, old_logp=logp, ref_logp=ref, advantages=torch.zeros(4, 20)))
    out.update(logp=logp.double(), ref=ref.double(), loss=float(metrics["loss"]),
               kl_metric=float(metrics["actor/kl_ref_k3"] / metrics["actor/kl_ref_k3/count"]),
               frozen=all(not p.requires_grad for c in reference.actor.model for p in c.parameters()))
    teardown_parallel(destroy_process_group=False)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("kl") / "model", "qwen3", seed=0)


def test_reference_is_the_initial_policy_and_the_kl_term_matches_k3(model_dir):
    out = run_distributed(_kl_worker, 1, args=(model_dir,), timeout=300)[0]
    batch = _batch(int(json.loads((model_dir / "config.json").read_text())["vocab_size"]))
    hf = _hf_logp(model_dir, batch)
    assert (out["ref_before"] - hf).abs().max() < 1e-5
    assert torch.equal(out["ref_after"], out["ref_before"])  # the actor trained, the reference did not move
    assert out["frozen"]
    mask = batch["loss_mask"].bool()
    moved = (out["logp"] - out["ref"])[mask].abs().max()
    assert moved > 1e-3, "the actor should differ from the reference for the check to mean anything"
    log_r = (out["ref"] - out["logp"])[mask]
    k3 = (log_r.exp() - 1.0 - log_r).mean()
    print(f"max |logp - ref| {float(moved):.3g}; k3 {float(k3):.6g}; loss {out['loss']:.6g}")
    assert out["loss"] == pytest.approx(KL_COEF * float(k3), rel=1e-5, abs=1e-9)
    assert out["kl_metric"] == pytest.approx(float(k3), rel=1e-5, abs=1e-9)


def test_five_steps_with_a_kl_penalty_train(tmp_path, model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    sets = [f"model.path={model_dir}", f"data.train_path={data}", "data.reward=test_train_kl:parity_reward",
            "train.prompts_per_step=4", "train.updates_per_step=2", "rollout.max_response_len=8", "optim.lr=1e-3",
            "algo.spo.pool_size=8", "algo.loss.kl_coef=0.1", "train.steps=5", "io.tensorboard=false",
            f"io.run_dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "megatron_spo.train"] + [a for s in sets for a in ("--set", s)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1",
                                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")])))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "reference policy (KL penalty)" in proc.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(5))
    kl = [m["actor/kl_ref_k3"] for m in metrics]
    print(f"actor/kl_ref_k3 per step: {kl}; losses {[m['loss'] for m in metrics]}")
    for m in metrics:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["kl/k3"] == m["actor/kl_ref_k3"]
    assert all(k > 0 for k in kl[1:]), kl
