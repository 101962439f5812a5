"""Chunked vocab-parallel log-probs/entropy equal a direct log_softmax, values and gradients, incl. TP=2."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_spo.megatron.launch import run_distributed
from megatron_spo.megatron.logprobs import chunked_logprobs_from_hidden, chunked_logprobs_from_logits


def _reference(hidden, weight, targets, temperature):
    """Direct fp64 maths: full log_softmax (fine at test sizes)."""
    logits = (hidden.double() @ weight.double().t()) / temperature
    logsm = torch.log_softmax(logits, -1)
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


def _data(n=37, h=8, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    g_lp = torch.randn(n, generator=g)
    g_h = torch.randn(n, generator=g)
    return hidden, weight, targets, g_lp, g_h


def _grads(fn, hidden, weight, targets, g_lp, g_h):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    logp, ent = fn(hidden, weight, targets)
    ((logp * g_lp).sum() + (ent * g_h).sum()).backward()
    return logp.detach(), ent.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_hidden_path_matches_full_log_softmax(temperature, chunk):
    hidden, weight, targets, g_lp, g_h = _data()
    ours = _grads(lambda h, w, t: chunked_logprobs_from_hidden(h, w, t, temperature=temperature, chunk_tokens=chunk),
                  hidden, weight, targets, g_lp, g_h)
    ref = _grads(lambda h, w, t: tuple(x.float() for x in _reference(h, w, t, temperature)),
                 hidden, weight, targets, g_lp, g_h)
    for a, b in zip(ours, ref):
        assert (a - b).abs().max().item() < 2e-5


def test_logits_path_matches_full_log_softmax():
    hidden, weight, targets, g_lp, g_h = _data(seed=1)
    logits = (hidden @ weight.t()).requires_grad_(True)
    logp, ent = chunked_logprobs_from_logits(logits, targets, temperature=0.9, chunk_tokens=4)
    ((logp * g_lp).sum() + (ent * g_h).sum()).backward()
    ref_logits = (hidden @ weight.t()).double().requires_grad_(True)
    logsm = torch.log_softmax(ref_logits / 0.9, -1)
    r_lp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    r_ent = -(logsm.exp() * logsm).sum(-1)
    ((r_lp * g_lp.double()).sum() + (r_ent * g_h.double()).sum()).backward()
    assert (logp - r_lp).abs().max() < 1e-5 and (ent - r_ent).abs().max() < 1e-5
    assert (logits.grad - ref_logits.grad).abs().max() < 1e-5


def test_bad_targets_shape_and_temperature_are_named():
    hidden, weight, targets, _, _ = _data()
    with pytest.raises(ValueError, match=r"targets must be \[N=37\]"):
        chunked_logprobs_from_hidden(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="temperature=0"):
        chunked_logprobs_from_hidden(hidden, weight, targets, temperature=0)


def _tp2_worker():
    """Each rank holds half of the vocab; results must equal the single-process full-vocab maths."""
    rank = dist.get_rank()
    hidden, weight, targets, g_lp, g_h = _data(v=50)
    shard = weight[rank * 25:(rank + 1) * 25]
    group = dist.group.WORLD
    h = hidden.clone().requires_grad_(True)
    w = shard.clone().requires_grad_(True)
    logp, ent = chunked_logprobs_from_hidden(h, w, targets, chunk_tokens=6, tp_group=group, temperature=0.8)
    ((logp * g_lp).sum() + (ent * g_h).sum()).backward()
    grad_h = h.grad.clone()
    dist.all_reduce(grad_h, group=group)  # what copy_to_tensor_model_parallel_region does in backward
    ref = _grads(lambda a, b, t: tuple(x.float() for x in _reference(a, b, t, 0.8)), hidden, weight, targets, g_lp, g_h)
    return {
        "logp": (logp.detach() - ref[0]).abs().max().item(),
        "ent": (ent.detach() - ref[1]).abs().max().item(),
        "grad_h": (grad_h - ref[2]).abs().max().item(),
        "grad_w": (w.grad - ref[3][rank * 25:(rank + 1) * 25]).abs().max().item(),
    }


def test_tensor_parallel_vocab_shards_match_single_process():
    for res in run_distributed(_tp2_worker, 2, timeout=120):
        assert max(res.values()) < 2e-5, res
