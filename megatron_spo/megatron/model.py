"""Build a megatron-core ``GPTModel`` from a HF config (Qwen3, Qwen3-MoE, Llama).

``hf_to_transformer_config`` maps the HF fields onto megatron's ``TransformerConfig``;
``build_model`` builds one ``GPTModel`` per (virtual) pipeline stage of this rank, with the
Transformer Engine layer spec when TE imports and CUDA is present, the local spec otherwise.
``initialize_parallel`` (parallel.py) must have run first.

Qwen3-MoE routing: HF does softmax over all experts, top-k, then (``norm_topk_prob``) renormalises
the k probabilities. megatron's default router (``moe_router_pre_softmax=False``) takes top-k of the
logits and softmaxes over the k — the same numbers as renormalising; with ``norm_topk_prob=False``
we set ``moe_router_pre_softmax=True`` (softmax over all experts, then top-k, no renormalisation).
The load-balancing aux loss is off by default (RL fine-tuning, as in the issue); ``aux_loss_coef>0``
turns it on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from megatron_spo.megatron.imports import check_transformer_engine

SUPPORTED = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
}
_ARCH_TO_FAMILY = {arch: family for family, arch in SUPPORTED.items()}


class UnsupportedArchitectureError(ValueError):
    """The HF config names a model family this builder does not map."""


def load_hf_config(source: Union[str, os.PathLike, Dict[str, Any], Any]) -> Dict[str, Any]:
    """A HF config as a plain dict, from a model dir / config.json path, a dict, or a PretrainedConfig."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no HF config.json at {path}")
        with open(path) as fh:
            return json.load(fh)
    if isinstance(source, dict):
        return dict(source)
    if hasattr(source, "to_dict"):
        return source.to_dict()
    raise TypeError(f"cannot read a HF config from {type(source).__name__}")


def model_family(cfg: Dict[str, Any]) -> str:
    """'qwen3' | 'qwen3_moe' | 'llama' from ``architectures`` or ``model_type``; clear error otherwise."""
    for arch in cfg.get("architectures") or []:
        if arch in _ARCH_TO_FAMILY:
            return _ARCH_TO_FAMILY[arch]
        raise UnsupportedArchitectureError(
            f"unsupported HF architecture {arch!r}; supported: {sorted(_ARCH_TO_FAMILY)}")
    model_type = cfg.get("model_type")
    if model_type in SUPPORTED:
        return model_type
    raise UnsupportedArchitectureError(
        f"unsupported HF model_type {model_type!r}; supported: {sorted(SUPPORTED)}")


def _rope_theta(cfg: Dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    rope_type = params.get("rope_type", "default") if params else (scaling or {}).get("rope_type", "default")
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise UnsupportedArchitectureError(f"unsupported RoPE scaling {params or scaling!r}; only 'default' is mapped")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ValueError("HF config has no rope_theta (neither rope_parameters.rope_theta nor rope_theta)")
    return float(theta)


def _moe_layer_freq(cfg: Dict[str, Any]) -> Union[int, List[int]]:
    """Qwen3-MoE: layer i is sparse iff i not in mlp_only_layers and (i+1) % decoder_sparse_step == 0."""
    n = cfg["num_hidden_layers"]
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense = set(cfg.get("mlp_only_layers") or [])
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(n)]
    return 1 if all(pattern) else pattern


def use_te_spec() -> bool:
    """True when the Transformer Engine spec can be used: TE imports and CUDA is present."""
    return torch.cuda.is_available() and check_transformer_engine()


def hf_to_transformer_config(
    hf_config: Any, *, params_dtype: torch.dtype = torch.float32, aux_loss_coef: float = 0.0,
    sequence_parallel: bool = False, **overrides: Any,
):
    """Map a HF config onto megatron's ``TransformerConfig`` for the current parallel state.

    Args:
        hf_config: config dict, PretrainedConfig, or a path to a model dir / config.json.
        params_dtype: torch.float32 or torch.bfloat16 parameters.
        aux_loss_coef: MoE load-balancing aux loss coefficient; 0 (default) disables the aux loss.
        sequence_parallel: GPU only.
        overrides: extra ``TransformerConfig`` fields (win over the mapped ones).
    """
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    cfg = load_hf_config(hf_config)
    family = model_family(cfg)
    if params_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"params_dtype={params_dtype} not supported; use torch.float32 or torch.bfloat16")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"hidden_act={cfg.get('hidden_act')!r}; only 'silu' (SwiGLU) is mapped")
    heads = cfg["num_attention_heads"]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if cfg["vocab_size"] % tp:
        raise ValueError(f"vocab_size={cfg['vocab_size']} is not divisible by tp={tp} (vocab-parallel embedding)")
    kw: Dict[str, Any] = dict(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        qk_layernorm=family in ("qwen3", "qwen3_moe"),
        add_qkv_bias=bool(cfg.get("attention_bias", False)),
        add_bias_linear=bool(cfg.get("mlp_bias", False)),
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        hidden_dropout=0.0,
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        # Dynamic batch size: micro-batches have different lengths, so PP p2p shapes are exchanged.
        # (not with virtual stages: the interleaved schedule needs fixed shapes; the actor pads).
        variable_seq_lengths=pp > 1 and not parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        # On gloo, batched isend/irecv in the interleaved (VPP) schedule's steady 1F1B phase gave
        # wrong activations for later micro-batches (measured); individual p2p ops are correct.
        batch_p2p_comm=torch.cuda.is_available(),
        # megatron validates the dispatcher even for dense models; alltoall is the one that
        # supports variable sequence lengths (and EP on CPU, see cpu.py).
        moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=not torch.cuda.is_available(),
        # The actor divides each micro-batch loss by the global normaliser itself; this makes megatron
        # sum (not average) grads over DP and micro-batches (see optimizer.py).
        calculate_per_token_loss=True,
    )
    if family == "qwen3_moe":
        experts = cfg.get("num_experts") or cfg.get("num_local_experts")
        kw.update(
            num_moe_experts=experts,
            moe_router_topk=cfg["num_experts_per_tok"],
            moe_ffn_hidden_size=cfg["moe_intermediate_size"],
            moe_router_pre_softmax=not cfg.get("norm_topk_prob", False),
            moe_layer_freq=_moe_layer_freq(cfg),
            moe_router_load_balancing_type="aux_loss" if aux_loss_coef > 0 else "none",
            moe_aux_loss_coeff=aux_loss_coef,
            moe_grouped_gemm=torch.cuda.is_available(),
            moe_router_dtype="fp32",
        )
    kw.update(overrides)
    return TransformerConfig(**kw)


def recompute_overrides(recompute: str, method: str = "uniform", num_layers: int = 1,
                        modules: Sequence[str] = ("core_attn",)) -> Dict[str, Any]:
    """``TransformerConfig`` fields for activation recompute (pass to ``build_model`` / ``MegatronActor``).

    ``recompute``: "none"; "full" (whole layers: ``method`` "uniform" makes every ``num_layers`` layers one
    unit, "block" recomputes the first ``num_layers`` layers of each pipeline stage); or "selective" (only
    ``modules``, megatron's names: core_attn, mlp, moe, layernorm, moe_act, shared_experts). Losses and
    gradients are unchanged (tests/megatron/test_recompute.py); only activation memory and compute move.
    """
    if recompute == "none":
        return {}
    if recompute == "full":
        if method not in ("uniform", "block") or num_layers < 1:
            raise ValueError(f"recompute=full needs method 'uniform' or 'block' and num_layers >= 1, "
                             f"got method={method!r} num_layers={num_layers}")
        return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}
    if recompute == "selective":
        if not modules:
            raise ValueError("recompute=selective needs at least one module")
        return {"recompute_granularity": "selective", "recompute_modules": list(modules)}
    raise ValueError(f"recompute={recompute!r}; choose 'none', 'full' or 'selective'")


# Local spec: torch's fused SDPA as core attention (``attention.SDPAttention``). It changes the
# actor's numbers at float rounding (~1e-7) against megatron's unfused attention; False restores
# megatron's (and the numbers recorded before it).
FUSED_LOCAL_ATTENTION = True


def layer_spec(config: Any, use_te: Optional[bool] = None, vp_stage: Optional[int] = None,
               fused_attention: Optional[bool] = None):
    """The decoder block spec: TE when available (GPU), else the local spec with RMSNorm.

    On the local spec ``fused_attention`` (default ``FUSED_LOCAL_ATTENTION``) swaps megatron's
    unfused core attention for ``attention.SDPAttention`` (same results up to float rounding).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    use_te = use_te_spec() if use_te is None else use_te
    fused_attention = FUSED_LOCAL_ATTENTION if fused_attention is None else fused_attention
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm",
                                      vp_stage=vp_stage)
    if not use_te and fused_attention:
        from megatron_spo.megatron.attention import SDPAttention

        spec.layer_specs = [_with_core_attention(layer, SDPAttention) for layer in spec.layer_specs]
    return spec


def _with_core_attention(layer: Any, module: type) -> Any:
    """A copy of a transformer-layer ``ModuleSpec`` whose self-attention uses ``module`` as core attention."""
    import dataclasses

    attn = layer.submodules.self_attention
    attn_subs = dataclasses.replace(attn.submodules, core_attention=module)
    subs = dataclasses.replace(layer.submodules, self_attention=dataclasses.replace(attn, submodules=attn_subs))
    return dataclasses.replace(layer, submodules=subs)


def build_model(
    hf_config: Any, *, params_dtype: torch.dtype = torch.float32, aux_loss_coef: float = 0.0,
    use_te: Optional[bool] = None, sequence_parallel: bool = False, **overrides: Any,
) -> List[torch.nn.Module]:
    """Build this rank's ``GPTModel`` chunk(s): one per virtual pipeline stage (one without VPP).

    Returns a list of un-wrapped ``GPTModel`` (wrap with DDP in optimizer.py). The output layer
    returns vocab-parallel logits [T, B, V/tp] (``parallel_output=True``).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    cfg = load_hf_config(hf_config)
    config = hf_to_transformer_config(cfg, params_dtype=params_dtype, aux_loss_coef=aux_loss_coef,
                                      sequence_parallel=sequence_parallel, **overrides)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(config, use_te, vp_stage=stage),
            vocab_size=cfg["vocab_size"],
            max_sequence_length=cfg["max_position_embeddings"],
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=_rope_theta(cfg),
            vp_stage=stage,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
