"""HF <-> Megatron-core parameter mapping for Qwen3, Qwen3-MoE and Llama (local and TE layer specs).

Why our own mapping: megatron-bridge cannot be imported without Transformer Engine (a hard
``import transformer_engine.pytorch``), and mbridge needs transformers < 5, three monkeypatches for
the local spec, and has no per-expert mapping for Qwen3-MoE's SequentialMLP
(``local_experts.{j}.linear_fc1``); see docs/megatron_on_cpu.md §9. So the mapping is written once,
here: small, table-driven, pure torch and strings, and checked against transformers' forward.

Vocabulary of this module:

* names are those of the local layer spec; :func:`globalize_name` also accepts the Transformer Engine
  spec's fused-norm and grouped-expert names (``linear_qkv.layer_norm_weight``,
  ``experts.linear_fc1.weight{j}``) and maps them to the local ones (not exercised on CPU);
* a **full Megatron tensor** is the parameter as a TP=1 model holds it, with global layer and expert
  indices in its name (``decoder.layers.{l}.mlp.experts.local_experts.{e}.linear_fc1.weight`` with
  ``e`` the *global* expert id) and the vocabulary padded to Megatron's ``padded_vocab_size``;
* an :class:`Entry` ties one Megatron name to the HF names it is made of, how the values are
  rearranged (:data:`COPY`, :data:`VOCAB`, :data:`QKV`, :data:`GATE_UP`) and how tensor parallelism
  splits the full tensor (:mod:`megatron_spo.convert.sharding`).

Layouts (checked against megatron.core ``SelfAttention.get_query_key_value_tensors`` and ``MLP``):

* ``linear_qkv.weight`` [ng * (nh/ng + 2) * d, H] is interleaved per query group g:
  ``[q heads of group g (nh/ng * d rows), k_g (d rows), v_g (d rows)]`` for g = 0..ng-1;
* ``linear_fc1.weight`` [2 * F, H] is ``[gate_proj; up_proj]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

# How HF tensors become the full Megatron tensor (and back).
COPY = "copy"        # one HF tensor, same values
VOCAB = "vocab"      # one HF tensor [V, H], Megatron pads rows to padded_vocab_size with zeros
QKV = "qkv"          # q_proj, k_proj, v_proj -> interleaved per query group
GATE_UP = "gate_up"  # gate_proj, up_proj -> [gate; up]

# How tensor parallelism splits the full Megatron tensor (see sharding.py).
REPLICATED = "replicated"
COLUMN = "column"          # ColumnParallelLinear / VocabParallelEmbedding: contiguous chunks of dim 0
ROW = "row"                # RowParallelLinear: contiguous chunks of dim 1
GLU_COLUMN = "glu_column"  # fused [gate; up]: rank r holds [gate chunk r; up chunk r]

SUPPORTED_FAMILIES = ("qwen3", "qwen3_moe", "llama")


@dataclass(frozen=True)
class Rule:
    """One row of a family table: Megatron name suffix, HF name suffixes, conversion, TP split."""

    mcore: str
    hf: Tuple[str, ...]
    conv: str = COPY
    split: str = REPLICATED


@dataclass(frozen=True)
class Entry:
    """One Megatron parameter of a concrete model, with global layer/expert indices.

    ``layer`` is the global layer index (None for embedding, final norm, output layer); ``expert``
    the global expert id (None unless an MoE expert weight).
    """

    mcore: str
    hf: Tuple[str, ...]
    conv: str
    split: str
    layer: Optional[int] = None
    expert: Optional[int] = None

    @property
    def is_expert(self) -> bool:
        return self.expert is not None


# ---- the family tables (suffixes after "decoder.layers.{l}." / "model.layers.{l}.") ----
_ATTENTION = (
    Rule("input_layernorm.weight", ("input_layernorm.weight",)),
    Rule("self_attention.linear_qkv.weight",
         ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV, COLUMN),
    Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), COPY, ROW),
)
_QK_NORM = (
    Rule("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",)),
    Rule("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",)),
)
_DENSE_MLP = (
    Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
    Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP, GLU_COLUMN),
    Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), COPY, ROW),
)
_MOE_MLP = (
    Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
    Rule("mlp.router.weight", ("mlp.gate.weight",)),
)
# {e} is the global expert id on both sides.
_EXPERT = (
    Rule("mlp.experts.local_experts.{e}.linear_fc1.weight",
         ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), GATE_UP, GLU_COLUMN),
    Rule("mlp.experts.local_experts.{e}.linear_fc2.weight", ("mlp.experts.{e}.down_proj.weight",), COPY, ROW),
)
_EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, COLUMN)
_FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",))
_OUTPUT = Rule("output_layer.weight", ("lm_head.weight",), VOCAB, COLUMN)
# Tied embeddings: the last PP stage still holds an `output_layer.weight` copy; it loads from the
# embedding and is never exported (HF stores only embed_tokens).
_OUTPUT_TIED = Rule("output_layer.weight", ("model.embed_tokens.weight",), VOCAB, COLUMN)

_FAMILY_FEATURES = {"qwen3": dict(qk_norm=True), "qwen3_moe": dict(qk_norm=True), "llama": dict(qk_norm=False)}


@dataclass(frozen=True)
class ModelDims:
    """The shape facts the mapping needs, read from a HF config.

    ``padded_vocab_size`` is Megatron's embedding row count (>= ``vocab_size``); it depends on the
    TP size and ``make_vocab_size_divisible_by`` of the Megatron model, so callers that hold a model
    set it with :meth:`with_padded_vocab`.
    """

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tied: bool
    qk_norm: bool
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_layers: Tuple[int, ...] = ()
    padded_vocab_size: int = 0

    def __post_init__(self):
        if self.padded_vocab_size == 0:
            object.__setattr__(self, "padded_vocab_size", self.vocab_size)
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_kv_heads}")

    def with_padded_vocab(self, padded_vocab_size: int) -> "ModelDims":
        return ModelDims(**{**self.__dict__, "padded_vocab_size": int(padded_vocab_size)})


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def dims_from_hf_config(cfg: Any) -> ModelDims:
    """Read :class:`ModelDims` from a transformers config object or a ``config.json`` dict.

    Raises:
        ValueError: the model type is not supported, or it uses a feature the mapping does not
            cover (biases in attention/MLP, shared experts), naming the config key.
    """
    family = _cfg_get(cfg, "model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"model_type {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}")
    for key in ("attention_bias", "mlp_bias"):
        if _cfg_get(cfg, key, False):
            raise ValueError(f"config key {key}=True is not supported by the {family} mapping (no biases mapped)")
    if _cfg_get(cfg, "shared_expert_intermediate_size", 0):
        raise ValueError("config key shared_expert_intermediate_size > 0: shared experts are not mapped")
    hidden = int(_cfg_get(cfg, "hidden_size"))
    heads = int(_cfg_get(cfg, "num_attention_heads"))
    kv = _cfg_get(cfg, "num_key_value_heads") or heads
    head_dim = _cfg_get(cfg, "head_dim") or hidden // heads
    layers = int(_cfg_get(cfg, "num_hidden_layers"))
    num_experts, moe_ffn, moe_layers = 0, 0, ()
    if family == "qwen3_moe":
        # transformers 5 writes the alias `num_local_experts` into config.json
        num_experts = int(_cfg_get(cfg, "num_experts", None) or _cfg_get(cfg, "num_local_experts", 0) or 0)
        if num_experts <= 0:
            raise ValueError("qwen3_moe config has neither num_experts nor num_local_experts > 0")
        moe_ffn = int(_cfg_get(cfg, "moe_intermediate_size"))
        only_mlp = set(_cfg_get(cfg, "mlp_only_layers", None) or [])
        step = int(_cfg_get(cfg, "decoder_sparse_step", 1) or 1)
        # Same rule as transformers' Qwen3MoeDecoderLayer.
        moe_layers = tuple(i for i in range(layers)
                           if i not in only_mlp and num_experts > 0 and (i + 1) % step == 0)
    return ModelDims(
        family=family, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=int(kv),
        head_dim=int(head_dim), ffn_hidden_size=int(_cfg_get(cfg, "intermediate_size")),
        vocab_size=int(_cfg_get(cfg, "vocab_size")), tied=bool(_cfg_get(cfg, "tie_word_embeddings", False)),
        qk_norm=_FAMILY_FEATURES[family]["qk_norm"], num_experts=num_experts, moe_ffn_hidden_size=moe_ffn,
        moe_layers=moe_layers,
    )


def _layer_entries(dims: ModelDims, layer: int) -> List[Entry]:
    rules: List[Rule] = list(_ATTENTION)
    if dims.qk_norm:
        rules += _QK_NORM
    moe = layer in dims.moe_layers
    rules += _MOE_MLP if moe else _DENSE_MLP
    mp, hp = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    out = [Entry(mp + r.mcore, tuple(hp + h for h in r.hf), r.conv, r.split, layer) for r in rules]
    if moe:
        for e in range(dims.num_experts):
            out += [Entry(mp + r.mcore.format(e=e), tuple(hp + h.format(e=e) for h in r.hf), r.conv, r.split,
                          layer, e) for r in _EXPERT]
    return out


def entries(dims: ModelDims, *, include_tied_output: bool = False) -> List[Entry]:
    """All Megatron parameters of the model in HF order (embedding, layers, final norm, output).

    ``include_tied_output``: with tied embeddings, also list the output layer (which loads from
    ``model.embed_tokens.weight``); the exporter leaves it out, the loader needs it for the last
    PP stage.
    """
    out = [Entry(_EMBEDDING.mcore, _EMBEDDING.hf, _EMBEDDING.conv, _EMBEDDING.split)]
    for layer in range(dims.num_layers):
        out += _layer_entries(dims, layer)
    out.append(Entry(_FINAL_NORM.mcore, _FINAL_NORM.hf, _FINAL_NORM.conv, _FINAL_NORM.split))
    if not dims.tied:
        out.append(Entry(_OUTPUT.mcore, _OUTPUT.hf, _OUTPUT.conv, _OUTPUT.split))
    elif include_tied_output:
        out.append(Entry(_OUTPUT_TIED.mcore, _OUTPUT_TIED.hf, _OUTPUT_TIED.conv, _OUTPUT_TIED.split))
    return out


def entry_index(dims: ModelDims) -> Dict[str, Entry]:
    """Megatron name -> :class:`Entry`, including a tied output layer."""
    return {e.mcore: e for e in entries(dims, include_tied_output=True)}


# ---- value conversions between HF tensors and the full Megatron tensor ----
def hf_to_mcore(entry: Entry, hf_tensors: Sequence[torch.Tensor], dims: ModelDims) -> torch.Tensor:
    """Build the full Megatron tensor of ``entry`` from its HF tensors (in ``entry.hf`` order).

    Shapes: QKV takes q [nh*d, H], k [ng*d, H], v [ng*d, H] and returns [ng*(nh/ng+2)*d, H];
    GATE_UP takes gate [F, H], up [F, H] and returns [2F, H]; VOCAB pads [V, H] to [Vp, H].
    """
    if len(hf_tensors) != len(entry.hf):
        raise ValueError(f"{entry.mcore}: expected {len(entry.hf)} HF tensors {entry.hf}, got {len(hf_tensors)}")
    if entry.conv == COPY:
        return hf_tensors[0]
    if entry.conv == VOCAB:
        (w,) = hf_tensors
        if w.shape[0] != dims.vocab_size:
            raise ValueError(f"{entry.hf[0]}: {w.shape[0]} rows, config vocab_size is {dims.vocab_size}")
        if dims.padded_vocab_size == w.shape[0]:
            return w
        pad = w.new_zeros((dims.padded_vocab_size - w.shape[0],) + tuple(w.shape[1:]))
        return torch.cat([w, pad], dim=0)
    if entry.conv == QKV:
        q, k, v = hf_tensors
        ng, d = dims.num_kv_heads, dims.head_dim
        per = dims.num_heads // ng
        for name, t, rows in zip(entry.hf, (q, k, v), (dims.num_heads * d, ng * d, ng * d)):
            if t.shape[0] != rows:
                raise ValueError(f"{name}: {t.shape[0]} rows, expected {rows} from the config")
        rest = tuple(q.shape[1:])
        qkv = torch.cat([q.reshape((ng, per * d) + rest), k.reshape((ng, d) + rest), v.reshape((ng, d) + rest)],
                        dim=1)
        return qkv.reshape((ng * (per + 2) * d,) + rest)
    if entry.conv == GATE_UP:
        gate, up = hf_tensors
        if gate.shape != up.shape:
            raise ValueError(f"{entry.hf[0]} {tuple(gate.shape)} and {entry.hf[1]} {tuple(up.shape)} differ in shape")
        return torch.cat([gate, up], dim=0)
    raise ValueError(f"{entry.mcore}: unknown conversion {entry.conv!r}")


def mcore_to_hf(entry: Entry, full: torch.Tensor, dims: ModelDims) -> List[Tuple[str, torch.Tensor]]:
    """Split the full Megatron tensor of ``entry`` into ``(hf_name, tensor)`` pairs (views, no copy)."""
    if entry.conv == COPY:
        return [(entry.hf[0], full)]
    if entry.conv == VOCAB:
        return [(entry.hf[0], full[: dims.vocab_size])]
    if entry.conv == QKV:
        ng, d = dims.num_kv_heads, dims.head_dim
        per = dims.num_heads // ng
        rest = tuple(full.shape[1:])
        grouped = full.reshape((ng, (per + 2) * d) + rest)
        q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
        return [(entry.hf[0], q.reshape((ng * per * d,) + rest)), (entry.hf[1], k.reshape((ng * d,) + rest)),
                (entry.hf[2], v.reshape((ng * d,) + rest))]
    if entry.conv == GATE_UP:
        gate, up = torch.chunk(full, 2, dim=0)
        return [(entry.hf[0], gate), (entry.hf[1], up)]
    raise ValueError(f"{entry.mcore}: unknown conversion {entry.conv!r}")


# ---- local (per-rank) Megatron names <-> global names ----
_LAYER_RE = re.compile(r"^(?:module\.)*decoder\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.local_experts\.(\d+)\.")
# Transformer Engine spec names -> local spec names (TE fuses the pre-norms into the next linear and
# stores grouped experts as `weight{j}`).
_TE_ALIASES = ((".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
               (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"))
_GROUPED_EXPERT_RE = re.compile(r"\.mlp\.experts\.linear_fc([12])\.weight(\d+)$")


def globalize_name(local_name: str, layer_offset: int = 0, expert_offset: int = 0) -> str:
    """Turn a rank-local parameter name into the global name used by :func:`entries`.

    Under PP a stage numbers its layers from 0 (global = ``layer_offset`` + local); under EP a rank
    numbers its experts from 0 (global id = ``expert_offset`` + local index ``j``, where
    ``expert_offset = ep_rank * num_local_experts``). Wrapper prefixes (``module.``) are dropped.
    """
    name = re.sub(r"^(?:module\.)+", "", local_name)
    for te, local in _TE_ALIASES:
        if name.endswith(te):
            name = name[: -len(te)] + local
    name = _GROUPED_EXPERT_RE.sub(lambda m: f".mlp.experts.local_experts.{m.group(2)}.linear_fc{m.group(1)}.weight",
                                  name)
    name = _LAYER_RE.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name, count=1)
    return _EXPERT_RE.sub(lambda m: f".local_experts.{int(m.group(1)) + expert_offset}.", name, count=1)


def local_layer_index(name: str) -> Optional[int]:
    """The (rank-local) layer index in a Megatron parameter name, or None."""
    m = _LAYER_RE.match(re.sub(r"^(?:module\.)+", "", name))
    return int(m.group(1)) if m else None
