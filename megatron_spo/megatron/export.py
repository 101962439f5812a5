"""Streaming HF export from, and HF import into, a sharded megatron-core ``GPTModel``.

:func:`export_hf_weights` is THE path from Megatron weights to HF-named tensors: the rollout weight
sync and the offline ``convert mcore-to-hf`` both iterate it. It walks the parameters in HF order
(embedding, layers, final norm, output layer) and for each one

1. all-gathers the TP shards inside the owning stage's tensor-parallel group (the expert
   tensor-parallel group for expert weights) and merges them (:mod:`megatron_spo.convert.sharding`);
2. broadcasts the full tensor from its owner to all ranks when not every rank holds it (PP stages,
   EP ranks);
3. splits it into HF tensors (:mod:`megatron_spo.convert.mapping`) and adds them to the current
   bucket, which is yielded once it would exceed the byte budget.

So at most one bucket plus one parameter's full tensor are alive beyond the model itself: there is
never a full-model copy. Every rank of the world must iterate the generator (the collectives are
matched by order); every rank receives the same buckets.

:func:`load_hf_weights` goes the other way: each rank reads, from a HF directory or an in-memory
model, only the tensors of its own parameters, builds each full Megatron tensor and keeps its shard.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from megatron_spo.convert import hf_io, mapping, sharding

Bucket = List[Tuple[str, torch.Tensor]]
DEFAULT_BUCKET_BYTES = 512 << 20


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):  # DDP / Float16Module wrappers
        module = module.module
    return module


def _as_chunks(model: Union[torch.nn.Module, Sequence[torch.nn.Module]]) -> List[torch.nn.Module]:
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    return [_unwrap(c) for c in chunks]


def _hf_dict(hf_config: Any) -> Any:
    from megatron_spo.megatron.model import load_hf_config

    return load_hf_config(hf_config)


def local_parameters(model, dims: mapping.ModelDims) -> Dict[str, Tuple[torch.nn.Parameter, mapping.Entry]]:
    """This rank's parameters keyed by global Megatron name, with their mapping entries.

    Global layer index = ``layer.layer_number - 1`` (megatron adds the PP/VPP offset); global
    expert id = ``mlp.local_expert_indices[j]`` (``ep_rank * num_local_experts + j``).

    Raises:
        KeyError: a parameter that the family table does not map (naming it), so nothing is
            silently left out of an export or a load.
    """
    index = mapping.entry_index(dims)
    out: Dict[str, Tuple[torch.nn.Parameter, mapping.Entry]] = {}
    for chunk in _as_chunks(model):
        for name, param in chunk.named_parameters():
            layer_offset, expert_offset = 0, 0
            local = mapping.local_layer_index(name)
            if local is not None:
                layer = chunk.decoder.layers[local]
                layer_offset = layer.layer_number - 1 - local
                if ".local_experts." in name or ".experts.linear_fc" in name:
                    expert_offset = int(layer.mlp.local_expert_indices[0])
            gname = mapping.globalize_name(name, layer_offset, expert_offset)
            if gname not in index:
                raise KeyError(f"Megatron parameter {name!r} (global {gname!r}) has no HF mapping for "
                               f"family {dims.family!r}")
            out[gname] = (param, index[gname])
    return out


def _tp_group(entry: mapping.Entry):
    """(group, rank, size) of the tensor-parallel group that shards ``entry``."""
    from megatron.core import parallel_state as ps

    if entry.is_expert:
        return (ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_rank(),
                ps.get_expert_tensor_parallel_world_size())
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_world_size()


def model_dims(model, hf_config: Any) -> mapping.ModelDims:
    """:class:`ModelDims` of ``hf_config``, with the padded vocabulary of the Megatron model if this rank holds it."""
    dims = mapping.dims_from_hf_config(_hf_dict(hf_config))
    for chunk in _as_chunks(model):
        for name, p in chunk.named_parameters():
            if name.endswith(("embedding.word_embeddings.weight", "output_layer.weight")):
                _, _, tp = _tp_group(mapping.Entry(name, (), mapping.VOCAB, mapping.COLUMN))
                return dims.with_padded_vocab(p.shape[0] * tp)
    return dims


@torch.no_grad()
def load_hf_weights(model, source: Any, hf_config: Any = None, *,
                    progress: Optional[Callable[[str], None]] = None) -> int:
    """Copy HF weights into this rank's shards of ``model``; returns the number of parameters set.

    Args:
        model: a GPTModel chunk or list of chunks (possibly DDP-wrapped), already built for the
            current TP/PP/EP layout.
        source: a HF directory (safetensors), a transformers model, or a state dict.
        hf_config: the HF config (dict / PretrainedConfig / path); defaults to ``source`` when it is
            a directory, or ``source.config`` for a transformers model.
        progress: called with each Megatron parameter name once it is loaded (e.g. a tqdm update).

    Raises:
        KeyError: a tensor the mapping needs is missing from ``source`` (named).
        ValueError: a shape disagrees with the model (named, with both shapes).
    """
    if hf_config is None:
        hf_config = getattr(source, "config", None) or source
    src = hf_io.open_source(source)
    dims = model_dims(model, hf_config)
    count = 0
    for gname, (param, entry) in local_parameters(model, dims).items():
        _, rank, size = _tp_group(entry)
        edims = dims.with_padded_vocab(param.shape[0] * size) if entry.conv == mapping.VOCAB else dims
        full = mapping.hf_to_mcore(entry, [src.get(n) for n in entry.hf], edims)
        part = sharding.shard(full, entry.split, rank, size, name=gname)
        if tuple(part.shape) != tuple(param.shape):
            raise ValueError(f"{gname}: HF tensors {entry.hf} give a shard of shape {tuple(part.shape)}, "
                             f"the model parameter has {tuple(param.shape)} (tp rank {rank}/{size})")
        param.data.copy_(part)
        count += 1
        if progress is not None:
            progress(gname)
    return count


def _gather_full(param: torch.Tensor, entry: mapping.Entry, gname: str) -> torch.Tensor:
    group, _, size = _tp_group(entry)
    local = param.detach()
    if size == 1 or entry.split == mapping.REPLICATED:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return sharding.unshard(parts, entry.split, name=gname)


def iter_hf_tensors(model, hf_config: Any, *, dtype: Optional[torch.dtype] = None,
                    ) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the whole model in HF order, on every rank.

    Tensors may be views of the live parameters (TP=1 replicated weights): consume them before the
    next optimizer step. ``dtype`` casts on the way out (e.g. bf16 for rollout engines).
    """
    dims = model_dims(model, hf_config)
    local = local_parameters(model, dims)
    world = dist.get_world_size() if dist.is_initialized() else 1
    # Receive buffers live where collectives run: the GPU under nccl, the CPU under gloo.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # Who holds what: {global name: (full shape, dtype)} from every rank, exchanged once.
    mine = {}
    for gname, (param, entry) in local.items():
        if dims.tied and entry.mcore == "output_layer.weight":
            continue  # the tied copy on the last PP stage; HF stores only embed_tokens
        _, _, size = _tp_group(entry)
        mine[gname] = (sharding.full_shape(param.shape, entry.split, size), param.dtype)
    if world > 1:
        everyone: List[Dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    for entry in mapping.entries(dims):
        owners = [r for r, m in enumerate(everyone) if entry.mcore in m]
        if not owners:
            raise RuntimeError(f"no rank holds Megatron parameter {entry.mcore!r}; the model does not match "
                               f"the {dims.family} config ({dims.num_layers} layers, {dims.num_experts} experts)")
        full = _gather_full(local[entry.mcore][0], entry, entry.mcore) if entry.mcore in mine else None
        if len(owners) < world:
            src = owners[0]
            if dist.get_rank() != src:
                shape, dt = everyone[src][entry.mcore]
                full = torch.empty(shape, dtype=dt, device=device)
            dist.broadcast(full.contiguous() if dist.get_rank() == src else full, src=src)
        for hf_name, t in mapping.mcore_to_hf(entry, full, dims):
            yield hf_name, (t if dtype is None else t.to(dtype))


def num_hf_tensors(hf_config: Any) -> int:
    """How many HF tensors :func:`iter_hf_tensors` yields for this config (for progress bars)."""
    return sum(len(e.hf) for e in mapping.entries(mapping.dims_from_hf_config(_hf_dict(hf_config))))


def export_hf_weights(model, hf_config: Any, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                      dtype: Optional[torch.dtype] = None) -> Iterator[Bucket]:
    """Yield buckets (lists of ``(hf_name, full tensor)``) of at most ``bucket_bytes`` each.

    Collective: every rank must iterate to the end; every rank gets the same buckets. A single
    tensor larger than the budget forms its own bucket.
    """
    yield from hf_io.bucketize(iter_hf_tensors(model, hf_config, dtype=dtype), bucket_bytes)
