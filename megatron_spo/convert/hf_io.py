"""Reading HF weights lazily by name, and writing them as (sharded) safetensors with an index.

Sources hand out one tensor at a time, so loading a large checkpoint never holds more than the
tensors of one Megatron parameter. Names are those of HF checkpoints on disk (per-expert
``mlp.experts.{e}.gate_proj.weight``); an in-memory transformers >= 5 model stores Qwen3-MoE
experts fused (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]), and
:class:`StateDictSource` serves the per-expert names from those views.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
_FUSED_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class SafetensorsDirSource:
    """Tensors of a HF checkpoint directory (``model.safetensors`` or sharded with an index), read lazily."""

    def __init__(self, path: Union[str, os.PathLike]):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path}: no *.safetensors files and no model.safetensors.index.json")
            weight_map = None
        self._handles = {f: safe_open(str(self.path / f), framework="pt") for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self._where: Dict[str, str] = weight_map

    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        return self._handles[self._where[name]].get_tensor(name)


class StateDictSource:
    """Tensors of an in-memory state dict (e.g. ``model.state_dict()`` of a transformers model)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], what: str = "state dict"):
        self._sd = state_dict
        self.what = what

    def keys(self) -> List[str]:
        return list(self._sd)

    def __contains__(self, name: str) -> bool:
        return name in self._sd or self._fused(name) is not None

    def _fused(self, name: str) -> Optional[torch.Tensor]:
        m = _FUSED_EXPERT_RE.match(name)
        if not m:
            return None
        prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
        if kind == "down_proj":
            t = self._sd.get(f"{prefix}.down_proj")
            return None if t is None else t[e]
        t = self._sd.get(f"{prefix}.gate_up_proj")
        if t is None:
            return None
        gate, up = torch.chunk(t[e], 2, dim=0)  # transformers chunks the fused output as (gate, up)
        return gate if kind == "gate_proj" else up

    def get(self, name: str) -> torch.Tensor:
        if name in self._sd:
            return self._sd[name]
        t = self._fused(name)
        if t is None:
            raise KeyError(f"{self.what}: tensor {name!r} not found")
        return t


def open_source(src) -> Union[SafetensorsDirSource, StateDictSource]:
    """A tensor source from a HF directory path, a ``torch.nn.Module`` or a state dict."""
    if isinstance(src, (SafetensorsDirSource, StateDictSource)):
        return src
    if isinstance(src, (str, os.PathLike)):
        return SafetensorsDirSource(src)
    if isinstance(src, torch.nn.Module):
        return StateDictSource(src.state_dict(), what=type(src).__name__)
    if isinstance(src, Mapping):
        return StateDictSource(src)
    raise TypeError(f"cannot read HF weights from a {type(src).__name__}; pass a directory, a module or a state dict")


class SafetensorsWriter:
    """Write ``(name, tensor)`` pairs into safetensors shards of at most ``max_shard_bytes`` each.

    One shard gives ``model.safetensors``; several give ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``, the layout ``from_pretrained`` reads. Tensors are buffered
    only up to one shard.
    """

    def __init__(self, out_dir: Union[str, os.PathLike], max_shard_bytes: int = 4 << 30):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = int(max_shard_bytes)
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: List[Tuple[str, List[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._files):
            raise ValueError(f"duplicate tensor name {name!r}")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # safetensors needs contiguous, non-shared storage: a clone of a view also drops the parent.
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def add_many(self, pairs: Iterable[Tuple[str, torch.Tensor]]) -> None:
        for name, t in pairs:
            self.add(name, t)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        tmp = f"model-part-{len(self._files):05d}.safetensors"
        save_file(self._pending, str(self.out_dir / tmp), metadata={"format": "pt"})
        self._files.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> List[str]:
        """Flush, give the shards their final names, write the index; return the file names."""
        self._flush()
        n = len(self._files)
        if n == 0:
            raise ValueError(f"{self.out_dir}: no tensors were written")
        if n == 1:
            os.replace(self.out_dir / self._files[0][0], self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self._files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / tmp, self.out_dir / final)
            weight_map.update({k: final for k in keys})
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def copy_hf_metadata(src_dir: Union[str, os.PathLike], dst_dir: Union[str, os.PathLike]) -> List[str]:
    """Copy every non-weight file (config, generation config, tokenizer, chat template) from ``src_dir``."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    if "config.json" not in copied:
        raise FileNotFoundError(f"{src}: no config.json to copy")
    return copied


def bucketize(pairs: Iterable[Tuple[str, torch.Tensor]], budget_bytes: int) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs into lists of at most ``budget_bytes`` (a larger tensor gets its own list)."""
    if budget_bytes <= 0:
        raise ValueError(f"bucket budget must be > 0 bytes, got {budget_bytes}")
    bucket: List[Tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in pairs:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > budget_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket
