"""SPO exact-ρ row memory: each prompt's last trained row and its post-update log-probs (docs/algorithms.md §1.7).

``rho_mode="exact"`` is the reference (verl-recipe ``spo/spo_ray_trainer.py``, ``_get_spo_rho``): the
memory keeps, per prompt, the last trained row and its log-probs under the post-update policy
(:meth:`RowMemory.remember`); the caller re-scores that row with the current policy and
:meth:`RowMemory.distance` returns the masked mean |ℓ_then − ℓ_now| over its response tokens.

Choices where the reference is silent:

1. A stored row whose response mask is all zero gives D = 0 (no tokens, no measured drift); a prompt
   without a stored row (first visit) gives D = 0 too.
2. A key seen again replaces its previous row; a key repeated in one call keeps its last row.
3. Non-finite log-probs on response tokens (stored or re-scored) are a ``ValueError`` naming the key.

Memory is one stored row per visited prompt, as CPU tensors in a dict keyed by the tracker's prompt
index; the caller can shrink it by passing trimmed rows (e.g. without padding).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_spo.algos.spo_values import F64, check_keys

Lookup = Callable[[Sequence[str], str], torch.Tensor]


class RowMemory:
    """Stored rows per prompt index; ``lookup(keys, fn)`` maps keys to ``[B]`` indices (``KeyError`` if untracked)."""

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        # prompt index -> {"logp": [T], "response_mask": [T] bool, "rows": {name: tensor}}
        self._memory: Dict[int, Dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._memory)

    def remember(
        self,
        keys: Sequence[str],
        logp: torch.Tensor,
        response_mask: torch.Tensor,
        rows: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> None:
        """Store this step's rows and their **post-update** log-probs.

        Args:
            keys: ``B`` prompt keys (tracked).
            logp: ``[B, T]`` per-token log-probs of each row under the just-updated policy.
            response_mask: ``[B, T]`` bool/0-1, 1 on the model's response tokens (0 on prompt, padding and
                tool output); D is averaged over these positions.
            rows: optional tensors with leading dim B (token ids, positions, ...) the caller needs to
                re-score the row later; stored as given (row i of each), on CPU, returned by :meth:`stored`.
        """
        keys = check_keys(keys, "ValueTracker.remember")
        b = len(keys)
        if logp.dim() != 2 or logp.shape[0] != b:
            raise ValueError(f"remember: logp shape {tuple(logp.shape)}, expected [{b}, T]")
        if response_mask.shape != logp.shape:
            raise ValueError(f"remember: response_mask shape {tuple(response_mask.shape)} != logp shape {tuple(logp.shape)}")
        rows = dict(rows or {})
        for name, t in rows.items():
            if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != b:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"remember: rows[{name!r}] must be a tensor with leading dim {b}, got {shape}")
        idx = self._lookup(keys, "ValueTracker.remember")
        lp = logp.detach().to("cpu")
        mask = response_mask.detach().to("cpu").bool()
        bad = (mask & ~torch.isfinite(lp)).nonzero()
        if bad.numel():
            i, t = int(bad[0, 0]), int(bad[0, 1])
            raise ValueError(f"remember: logp of prompt {keys[i][:80]!r} is {lp[i, t].item()} at response token {t}")
        cpu_rows = {name: t.detach().to("cpu") for name, t in rows.items()}
        for i, p in enumerate(idx.tolist()):
            self._memory[p] = {
                "logp": lp[i].clone(),
                "response_mask": mask[i].clone(),
                "rows": {name: t[i].clone() for name, t in cpu_rows.items()},
            }

    def has(self, keys: Sequence[str]) -> torch.Tensor:
        """``[B]`` bool: the key has a stored row (false on a first visit). ``KeyError`` if untracked."""
        idx = self._lookup(keys, "ValueTracker.has_memory")
        return torch.tensor([p in self._memory for p in idx.tolist()], dtype=torch.bool)

    def stored(self, keys: Sequence[str]) -> List[Optional[Dict[str, torch.Tensor]]]:
        """Per key the stored row dict (``rows`` given to :meth:`remember` plus ``"response_mask"``), or None."""
        idx = self._lookup(keys, "ValueTracker.stored_rows")
        out: List[Optional[Dict[str, torch.Tensor]]] = []
        for p in idx.tolist():
            mem = self._memory.get(p)
            out.append(None if mem is None else {**mem["rows"], "response_mask": mem["response_mask"]})
        return out

    def distance(self, keys: Sequence[str], logp_now: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """``[B]`` float64 D = masked mean over the stored response tokens of |ℓ_then − ℓ_now|.

        Args:
            keys: ``B`` prompt keys.
            logp_now: length ``B``; item i is the current policy's log-probs ``[T_i]`` of key i's stored row
                (same shape as stored), or None / anything for a key without a stored row (first visit,
                D = 0). A ``[B, T]`` tensor works when every stored row has length T.
        """
        keys = check_keys(keys, "ValueTracker.exact_distance")
        if len(logp_now) != len(keys):
            raise ValueError(f"exact_distance: {len(logp_now)} logp rows for {len(keys)} keys")
        idx = self._lookup(keys, "ValueTracker.exact_distance")
        out = torch.zeros(len(keys), dtype=F64)
        for i, p in enumerate(idx.tolist()):
            mem = self._memory.get(p)
            if mem is None:
                continue
            now = logp_now[i]
            then, mask = mem["logp"], mem["response_mask"]
            if not isinstance(now, torch.Tensor) or now.shape != then.shape:
                shape = tuple(now.shape) if isinstance(now, torch.Tensor) else now
                raise ValueError(
                    f"exact_distance: logp_now for prompt {keys[i][:80]!r} (position {i}) has shape {shape}; "
                    f"its stored row has shape {tuple(then.shape)}"
                )
            now = now.detach().to(device="cpu", dtype=F64)
            if not bool(torch.isfinite(now[mask]).all()):
                raise ValueError(f"exact_distance: logp_now for prompt {keys[i][:80]!r} has non-finite response values")
            count = int(mask.sum())
            if count:  # an empty response carries no drift measurement: D stays 0
                out[i] = (then.to(F64) - now).abs()[mask].sum() / count
        return out

    def state(self) -> Tuple[torch.Tensor, List[Dict[str, Any]]]:
        """``(memory_index [M] int64, memory list of M entries)``, sorted by prompt index, all cloned."""
        mem_index = sorted(self._memory)
        memory = [_clone_entry(self._memory[p]) for p in mem_index]
        return torch.tensor(mem_index, dtype=torch.int64), memory

    def set_state(self, mem_index: Sequence[int], memory: Sequence[Mapping[str, Any]]) -> None:
        """Replace the memory with saved entries (matched to ``mem_index`` by the caller)."""
        self._memory = {i: _clone_entry(m) for i, m in zip(mem_index, memory)}


def _clone_entry(m: Mapping[str, Any]) -> Dict[str, Any]:
    return {"logp": m["logp"].clone(), "response_mask": m["response_mask"].clone(),
            "rows": {k: t.clone() for k, t in m["rows"].items()}}
