"""Log-probabilities and entropy of given tokens from vocab-parallel logits, chunked over tokens.

Two entry points share one chunk kernel:

* ``chunked_logprobs_from_hidden(hidden [N, H], weight [V/tp, H], targets [N])``: fuses the output
  layer, so neither the [N, V] logits nor their log-softmax ever exist; each chunk of tokens is
  projected and reduced; when gradients are needed the fp32 logits of the first chunks (up to
  ``SAVED_LOGITS_ELEMENTS``) are kept for the backward, which *recomputes* those of any further
  chunk (bit-identical: the same matmul on the same inputs). This is what the actor uses
  (GPTModel's final hidden states + its output weight; see ``hidden_states_output``).
* ``chunked_logprobs_from_logits(logits [N, V/tp], targets [N])``: for callers that already hold
  logits; the [N, V] log-softmax is still never materialised (the backward writes grad_logits, the
  size of the input, one chunk at a time).

Under tensor parallelism each rank holds a vocab shard ``[vocab_start, vocab_start + V/tp)``. Per
chunk: the max logit is all-reduced (MAX) over the TP group, then one SUM all-reduce carries
``sum exp(l - m)``, ``sum exp(l - m) * l`` and the target logit (contributed by the owning rank).
From these: ``logZ = m + log S``, ``logp = l_target - logZ``, ``entropy = logZ - E_p[l]``.
All maths is fp32 whatever the parameter dtype. ``temperature`` divides the logits first (the
sampler's distribution).

Gradients per chunk (``p = softmax(l)``, ``H`` the entropy, ``g_lp``/``g_H`` incoming grads)::

    d/dl_j = g_lp * (1[j == target] - p_j) - g_H * p_j * (l_j - logZ + H)

The hidden-state gradient of a vocab shard is partial; wrap ``hidden`` with megatron's
``copy_to_tensor_model_parallel_region`` (done by ``hidden_states_output`` callers via
``logprobs_from_model_hidden``) so its backward all-reduces over TP, exactly as ColumnParallelLinear does.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist

# Elements of one fp32 [chunk, V/tp] temporary: 2**25 = 128 MiB. With vocab 151,936 that is
# ~220 tokens per chunk; with a tiny vocab the whole batch is one chunk.
DEFAULT_CHUNK_ELEMENTS = 1 << 25


# Elements of fp32 logits the hidden-state function keeps from its forward for the backward
# (2**28 = 1 GiB): within it the backward does not recompute them.
SAVED_LOGITS_ELEMENTS = 1 << 28


def default_chunk_tokens(local_vocab: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(1, local_vocab))


def _tp_group_info(tp_group: Optional[dist.ProcessGroup]) -> Tuple[Optional[dist.ProcessGroup], int, int]:
    """(group, rank, world) of the TP group; megatron's when initialised, else a single rank."""
    if tp_group is None:
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                tp_group = parallel_state.get_tensor_model_parallel_group()
        except ImportError:
            tp_group = None
    if tp_group is None or not dist.is_initialized():
        return None, 0, 1
    return tp_group, dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                 group: Optional[dist.ProcessGroup], world: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For fp32 ``logits`` [n, V/tp] and global ``targets`` [n]: (logp [n], entropy [n], logZ [n])."""
    local_vocab = logits.shape[-1]
    m = logits.max(dim=-1).values
    if world > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    local_t = targets - vocab_start
    owned = (local_t >= 0) & (local_t < local_vocab)
    t_logit = logits.gather(-1, local_t.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1)
    exp = (logits - m.unsqueeze(-1)).exp_()  # one [n, V/tp] temporary
    sums = torch.stack([exp.sum(-1), torch.linalg.vecdot(exp, logits),
                        torch.where(owned, t_logit, torch.zeros_like(t_logit))])
    del exp
    if world > 1:
        dist.all_reduce(sums, group=group)
    log_z = m + sums[0].log()
    logp = sums[2] - log_z
    entropy = log_z - sums[1] / sums[0]
    return logp, entropy, log_z


def _chunk_grad(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, log_z: torch.Tensor,
                entropy: torch.Tensor, g_lp: torch.Tensor, g_h: torch.Tensor) -> torch.Tensor:
    """d(sum g_lp*logp + g_h*H)/d logits for one chunk: [n, V/tp] fp32 (see module docstring).

    Consumes ``logits`` (a per-chunk temporary): it is overwritten in place to save memory.
    """
    local_vocab = logits.shape[-1]
    centred = logits.sub_(log_z.unsqueeze(-1))  # log p_j
    if not bool(g_h.any()):
        # No entropy gradient (the usual case): -p * g_lp in two in-place passes. The same numbers as
        # the general formula below, where (log p + H) * 0 + g_lp is exactly g_lp.
        grad = centred.exp_().mul_(g_lp.neg().unsqueeze(-1))
    else:
        p = centred.exp()
        # -p * (g_lp + g_h * (log p + H)), built in place in `centred` then `p`
        centred.add_(entropy.unsqueeze(-1)).mul_(g_h.unsqueeze(-1)).add_(g_lp.unsqueeze(-1))
        grad = p.mul_(centred).neg_()
        del centred
    local_t = targets - vocab_start
    owned = (local_t >= 0) & (local_t < local_vocab)
    rows = owned.nonzero(as_tuple=True)[0]
    grad[rows, local_t[rows]] += g_lp[rows]
    return grad


def _project(hidden: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """[n, H] hidden, fp32 [V/tp, H] weight -> fp32 [n, V/tp] logits / temperature (a fresh tensor)."""
    logits = hidden.float() @ w.t()
    if temperature != 1.0:
        logits /= temperature
    return logits


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class _HiddenLogprobs(torch.autograd.Function):
    """(hidden [N, H], weight [V/tp, H], targets [N]) -> (logp [N], entropy [N]); fp32 outputs."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, vocab_start, group, world, keep):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp)
        log_z = torch.empty_like(logp)
        w = weight.float()
        # Keep the chunks' logits for the backward (it then skips their recompute, one of the output
        # layer's four matmuls) while they fit in the budget; later chunks are recomputed as before.
        budget, saved = SAVED_LOGITS_ELEMENTS, []
        for sl in _chunks(n, chunk):
            logits = _project(hidden[sl], w, temperature)
            logp[sl], entropy[sl], log_z[sl] = _chunk_stats(logits, targets[sl], vocab_start, group, world)
            keep = keep and logits.numel() <= budget  # the kept chunks are a prefix (backward pops them)
            if keep:
                budget -= logits.numel()
                saved.append(logits)
            del logits
        ctx.save_for_backward(hidden, weight, targets, log_z, entropy)
        ctx.saved_logits = saved
        ctx.cfg = (temperature, chunk, vocab_start)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_lp, g_h):
        hidden, weight, targets, log_z, entropy = ctx.saved_tensors
        temperature, chunk, vocab_start = ctx.cfg
        n = hidden.shape[0]
        g_lp = torch.zeros(n, device=hidden.device) if g_lp is None else g_lp.float()
        g_h = torch.zeros(n, device=hidden.device) if g_h is None else g_h.float()
        w = weight.float()
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        # Saved logits are consumed in place: taken off ctx so that a second backward recomputes them.
        saved, ctx.saved_logits = ctx.saved_logits[::-1], []
        for sl in _chunks(n, chunk):
            h = hidden[sl].float()
            logits = saved.pop() if saved else _project(h, w, temperature)
            grad = _chunk_grad(logits, targets[sl], vocab_start, log_z[sl], entropy[sl], g_lp[sl], g_h[sl])
            del logits
            if temperature != 1.0:
                grad /= temperature
            grad_hidden[sl] = grad @ w
            grad_weight.addmm_(grad.t(), h)
            del grad
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None, None, None, None, None)


class _LogitsLogprobs(torch.autograd.Function):
    """(logits [N, V/tp], targets [N]) -> (logp [N], entropy [N]); fp32 outputs."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk, vocab_start, group, world):
        n = logits.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logp)
        log_z = torch.empty_like(logp)
        for sl in _chunks(n, chunk):
            lc = logits[sl].float() / temperature
            logp[sl], entropy[sl], log_z[sl] = _chunk_stats(lc, targets[sl], vocab_start, group, world)
            del lc
        ctx.save_for_backward(logits, targets, log_z, entropy)
        ctx.cfg = (temperature, chunk, vocab_start)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_lp, g_h):
        logits, targets, log_z, entropy = ctx.saved_tensors
        temperature, chunk, vocab_start = ctx.cfg
        n = logits.shape[0]
        g_lp = torch.zeros(n, device=logits.device) if g_lp is None else g_lp.float()
        g_h = torch.zeros(n, device=logits.device) if g_h is None else g_h.float()
        grad_logits = torch.empty_like(logits)
        for sl in _chunks(n, chunk):
            lc = logits[sl].float() / temperature
            grad = _chunk_grad(lc, targets[sl], vocab_start, log_z[sl], entropy[sl], g_lp[sl], g_h[sl])
            grad_logits[sl] = grad / temperature
            del lc, grad
        return grad_logits, None, None, None, None, None, None


def _check(targets: torch.Tensor, n: int, temperature: float) -> None:
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must be [N={n}], got shape {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")


def chunked_logprobs_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
    chunk_tokens: Optional[int] = None, vocab_start: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of ``targets`` under ``softmax(hidden @ weight.T / temperature)``.

    Args:
        hidden: [N, H] final hidden states (already TP-replicated; see module docstring).
        weight: [V/tp, H] this rank's shard of the output (or tied embedding) weight.
        targets: [N] global token ids.
        chunk_tokens: tokens per chunk (default: ~128 MiB of fp32 logits per chunk).
        vocab_start: first global id of this rank's shard (default: tp_rank * V/tp).
        tp_group: TP process group (default: megatron's, or none when not initialised).

    Returns:
        (logp [N], entropy [N]) fp32, differentiable w.r.t. hidden and weight.
    """
    _check(targets, hidden.shape[0], temperature)
    group, rank, world = _tp_group_info(tp_group)
    local_vocab = weight.shape[0]
    start = rank * local_vocab if vocab_start is None else vocab_start
    chunk = chunk_tokens or default_chunk_tokens(local_vocab)
    # ``keep``: a backward will follow (inside ``forward`` grad mode is always off, so decide here)
    keep = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _HiddenLogprobs.apply(hidden, weight, targets, float(temperature), chunk, start, group, world, keep)


def chunked_logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
    chunk_tokens: Optional[int] = None, vocab_start: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Like ``chunked_logprobs_from_hidden`` for precomputed vocab-parallel ``logits`` [N, V/tp]."""
    _check(targets, logits.shape[0], temperature)
    group, rank, world = _tp_group_info(tp_group)
    local_vocab = logits.shape[-1]
    start = rank * local_vocab if vocab_start is None else vocab_start
    chunk = chunk_tokens or default_chunk_tokens(local_vocab)
    return _LogitsLogprobs.apply(logits, targets, float(temperature), chunk, start, group, world)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming grad contiguous.

    GPTModel returns ``output.transpose(0, 1).contiguous()``, so the grad reaching the output layer
    is a transposed view. megatron's ``_reduce`` all-reduces ``grad.contiguous()`` — a temporary when
    the grad is not contiguous — and returns the un-reduced original, silently dropping the TP
    all-reduce. The ColumnParallelLinear path never sees such a grad; our pass-through does.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


@contextlib.contextmanager
def hidden_states_output(model: torch.nn.Module) -> Iterator[None]:
    """Make a post-process ``GPTModel`` return its final-norm hidden states [B, S, H] instead of logits.

    The output layer's ``forward`` is swapped (on this instance only, restored on exit) for a
    pass-through, so the [S, B, V/tp] logits are never built; the weight stays registered under
    its own name (checkpoints and DDP are unaffected). Use ``output_weight(model)`` for the weight.
    """
    layer = getattr(model, "output_layer", None)
    if layer is None:
        yield
        return
    if getattr(layer, "sequence_parallel", False):
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        def passthrough(input_, weight=None, runtime_gather_output=None):
            return _ContiguousGrad.apply(gather_from_sequence_parallel_region(input_)), None
    else:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        def passthrough(input_, weight=None, runtime_gather_output=None):
            # identity forward, all-reduce of the (vocab-shard partial) input grad in backward
            return _ContiguousGrad.apply(copy_to_tensor_model_parallel_region(input_)), None

    layer.forward = passthrough
    try:
        yield
    finally:
        del layer.forward


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The [V/tp, H] output projection of a post-process GPTModel (tied embedding weight if shared)."""
    if getattr(model, "share_embeddings_and_output_weights", False):
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


@torch.no_grad()
def full_vocab_logits(model: torch.nn.Module, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, T]`` ids -> ``[B, T, V]`` logits over the whole (unpadded) vocabulary, TP shards gathered.

    A single-stage model (PP=1) in eval mode; for parity checks and inspection, not the training
    path (which never materialises full logits: see the chunked functions above).
    """
    from megatron.core import parallel_state as ps

    model.eval()
    pos = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    local = model(input_ids, pos, None)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        local = torch.cat(parts, dim=-1)
    return local[..., :vocab_size]
