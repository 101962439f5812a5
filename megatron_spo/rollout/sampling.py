"""Per-row sampling pieces of the embedded engine: temperature, top-k / top-p, log-probs, stop strings.

Every function works on a batch whose rows may carry different sampling settings (requests from
different callers batched together), so settings are ``[B]`` tensors, not scalars.

Log-prob convention (the one the trainer's importance ratio needs): the log-prob recorded for a
sampled token is ``log_softmax(logits / T)[token]`` taken *before* top-k / top-p truncation. At
``T = 1`` this is exactly the model's ``log pi(token | prefix)``, which is what the trainer
recomputes; at ``T != 1`` the trainer must divide its logits by the same ``T`` to compare (as verl
does). With ``T = 0`` (greedy) the record is the plain ``T = 1`` log-prob.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def scaled_logprobs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits / T)`` per row; rows with ``T <= 0`` (greedy) use ``T = 1``.

    Args:
        logits: ``[B, V]`` fp32 next-token logits.
        temperature: ``[B]`` temperatures.
    Returns:
        ``[B, V]`` log-probabilities (nats).
    """
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return torch.log_softmax(logits / t[:, None], dim=-1)


def truncate(logprobs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside each row's top-k and top-p nucleus with ``-inf``.

    Args:
        logprobs: ``[B, V]`` log-probabilities after temperature.
        top_k: ``[B]`` int; ``<= 0`` keeps all tokens.
        top_p: ``[B]`` float in (0, 1]; ``1`` keeps all tokens. The most likely token is always kept.
    Returns:
        ``[B, V]`` with removed entries set to ``-inf`` (not renormalised: sampling by Gumbel-max
        does not need it, and the recorded log-prob is the untruncated one).
    """
    vocab = logprobs.shape[-1]
    need_k = bool(((top_k > 0) & (top_k < vocab)).any())
    need_p = bool((top_p < 1.0).any())
    if not (need_k or need_p):
        return logprobs
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logprobs.device)[None, :]
    remove = torch.zeros_like(sorted_lp, dtype=torch.bool)
    if need_k:
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
        remove |= rank >= k[:, None]
    if need_p:
        probs = sorted_lp.exp()
        # Mass strictly before each token: a token is kept while the mass before it is < top_p.
        before = probs.cumsum(dim=-1) - probs
        remove |= before >= top_p[:, None]
    remove[:, 0] = False
    sorted_lp = sorted_lp.masked_fill(remove, float("-inf"))
    return torch.empty_like(logprobs).scatter_(-1, order, sorted_lp)


def gumbel_noise(shape: Tuple[int, int], generator: torch.Generator,
                 row_generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """Standard Gumbel noise ``[B, V]``; rows with their own (seeded) generator draw from it.

    ``argmax(logprobs + gumbel)`` is an exact sample from ``softmax(logprobs)`` (Gumbel-max trick),
    which lets one vectorised call sample every row while seeded rows stay reproducible whatever
    they are batched with.
    """
    u = torch.rand(shape, generator=generator)
    for i, g in enumerate(row_generators):
        if g is not None:
            u[i] = torch.rand(shape[1], generator=g)
    # Clamp away from 0 and 1 so that -log(-log u) is finite.
    u = u.clamp_(min=1e-20, max=1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generator: torch.Generator, row_generators: Sequence[Optional[torch.Generator]]
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row and return ``(token_ids [B], logprobs [B])``.

    ``logprobs`` follow the module convention: after temperature, before truncation.
    """
    lp = scaled_logprobs(logits.float(), temperature)
    filtered = truncate(lp, top_k, top_p)
    noisy = filtered + gumbel_noise(tuple(lp.shape), generator, row_generators)
    greedy = temperature <= 0
    if bool(greedy.any()):
        noisy = torch.where(greedy[:, None], filtered, noisy)
    tokens = noisy.argmax(dim=-1)
    return tokens, lp.gather(-1, tokens[:, None]).squeeze(-1)


class StopStringMatcher:
    """Finds stop strings in a growing token sequence by decoding only a short tail of ids.

    Each stop string of ``L`` characters spans at most ``4 L`` byte-level tokens (a token carries at
    least one UTF-8 byte), so decoding the last ``4 * max_len + 2`` ids after every new token finds
    any stop string as soon as it is complete. Text is decoded only to look for stop strings; the
    token ids are never re-tokenised.
    """

    def __init__(self, tokenizer, stops: Sequence[str]):
        if stops and tokenizer is None:
            raise ValueError("stop strings need a tokenizer; the model directory has none")
        for i, s in enumerate(stops):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.window = 4 * max((len(s) for s in stops), default=0) + 2

    def match(self, token_ids: List[int]) -> Optional[str]:
        """The stop string that the latest token completed, or None."""
        if not self.stops:
            return None
        tail = self.tokenizer.decode(token_ids[-self.window:], skip_special_tokens=False)
        for s in self.stops:
            if s in tail:
                return s
        return None
