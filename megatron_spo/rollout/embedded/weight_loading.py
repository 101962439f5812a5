"""Weight updates of the embedded engine: checked, in-place copies of HF-named tensors into the model.

A source is an HF checkpoint directory or an iterable of buckets, each a sequence of
``(hf_name, tensor)`` with checkpoint (file) names. Each bucket is checked (names, shapes) before
any of it is copied; buckets already copied stay applied if a later one is bad. transformers 5
fuses some checkpoint tensors in memory (e.g. MoE experts into one ``gate_up_proj``): those names
are collected and applied at the end through transformers' own weight conversion.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, Optional, Tuple

import torch

from megatron_spo.rollout.engine import NamedTensorBucket, WeightSource
from megatron_spo.rollout.weight_formats import load_hf_state


def buckets_of(source: WeightSource) -> Iterable[NamedTensorBucket]:
    """The buckets of ``source``: a directory is read now into one bucket; buckets pass through."""
    if isinstance(source, (str, os.PathLike)):
        return [list(load_hf_state(str(source)).items())]
    return source


def load_buckets(model, buckets: Iterable[NamedTensorBucket]) -> int:
    """Copy every bucket into ``model`` in place; returns the number of tensors loaded.

    Raises ValueError naming the bucket for an unknown name or a wrong shape (that bucket is not
    applied; earlier ones stay).
    """
    params = model.state_dict(keep_vars=True)
    ckpt_shapes: Optional[Dict[str, Tuple[int, ...]]] = None
    pending: Dict[str, torch.Tensor] = {}  # checkpoint names of parameters fused in memory
    loaded = 0
    with torch.no_grad():
        for b, bucket in enumerate(buckets):
            bucket = list(bucket)
            for name, tensor in bucket:
                if name in params:
                    expected = tuple(params[name].shape)
                else:
                    ckpt_shapes = ckpt_shapes or checkpoint_shapes(model)
                    if name not in ckpt_shapes:
                        raise ValueError(f"update_weights: bucket {b}: unknown parameter {name!r} "
                                         f"(model {type(model).__name__})")
                    expected = ckpt_shapes[name]
                if tuple(tensor.shape) != expected:
                    raise ValueError(f"update_weights: bucket {b}: {name!r} has shape {tuple(tensor.shape)}, "
                                     f"model expects {expected}")
            for name, tensor in bucket:
                if name in params:
                    params[name].data.copy_(tensor)
                else:
                    pending[name] = tensor
                loaded += 1
        if pending:
            load_converted(model, pending, params)
    return loaded


def checkpoint_shapes(model) -> Dict[str, Tuple[int, ...]]:
    """Checkpoint (HF file) names and shapes of every weight, as ``save_pretrained`` writes them."""
    return {n: tuple(t.shape) for n, t in checkpoint_state(model).items()}


def checkpoint_state(model) -> Dict[str, torch.Tensor]:
    """The model's weights under their checkpoint (file) names."""
    # transformers 5 fuses some checkpoint tensors in memory (e.g. MoE experts into one
    # gate_up_proj); its own revert gives the per-tensor checkpoint layout back.
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: memory names are checkpoint names
        return state
    return revert_weight_conversion(model, state)


def load_converted(model, pending: Dict[str, torch.Tensor], params: Dict[str, torch.Tensor]) -> None:
    """Apply checkpoint-named tensors whose parameters are fused in memory: transformers' own
    loader converts the full checkpoint-format state (current weights overlaid with ``pending``)."""
    full = checkpoint_state(model)
    full.update(pending)
    fresh = type(model).from_pretrained(None, config=model.config, state_dict=full, dtype=model.dtype)
    for name, tensor in fresh.state_dict().items():
        params[name].data.copy_(tensor)
