"""How weights travel to a rollout server: an HF checkpoint directory, or base64 safetensors buckets.

Both the trainer-side clients and the embedded server use these, so neither side depends on the
other: the SGLang client encodes buckets for ``/update_weights_from_tensor`` with
:func:`encode_bucket` and the embedded server decodes them with :func:`decode_bucket`; the vLLM
worker extension and the embedded engine read checkpoint directories with :func:`load_hf_state`.

The bucket envelope exists because real SGLang expects ``MultiprocessingSerializer`` strings (CUDA
IPC handles, pickle inside), which make no sense on CPU. Ours is the base64 of a safetensors file
holding one bucket ``{hf_name: tensor}`` (``load_format: "safetensors_b64"``): it never unpickles.
"""

from __future__ import annotations

import base64
import glob
import os
from typing import Dict, List, Tuple

import torch


def load_hf_state(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (``*.safetensors``, else ``pytorch_model*.bin``)."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        state: Dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f))
        return state
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin files in {path!r}")
    state = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def encode_bucket(bucket) -> str:
    """``[(hf_name, tensor)]`` -> base64 safetensors string for ``/update_weights_from_tensor``."""
    from safetensors.torch import save

    return base64.b64encode(save({n: t.detach().contiguous().cpu() for n, t in bucket})).decode("ascii")


def decode_bucket(text: str) -> List[Tuple[str, torch.Tensor]]:
    """Inverse of :func:`encode_bucket`: a list of ``(hf_name, tensor)``; never unpickles."""
    from safetensors.torch import load

    return list(load(base64.b64decode(text.encode("ascii"), validate=True)).items())
