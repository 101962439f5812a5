"""GPU-only actor features, written to pass on a machine with >= 2 CUDA devices (skipped on CPU).

Sequence parallelism (and so MoE with TP > 1), the distributed optimizer and the Transformer Engine
layer spec cannot run on CPU (docs/megatron_on_cpu.md §3, §7, §8). Each test compares a 2-GPU layout with the
single-GPU run of the same HF weights, like ``test_actor_parallel.py`` does on CPU. fp32 params;
tolerances are those of the CPU tests relaxed for TF32/cuBLAS reduction order.
"""

from __future__ import annotations

import pytest
import torch

from megatron_spo.megatron.launch import run_distributed
from megatron_spo.megatron.parallel import ParallelSizes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

TOL = 1e-4


def _worker(hf_dir, family, sizes, options):
    from test_actor_parallel import _run_layout, make_batch

    from megatron_spo.megatron.parallel import teardown_parallel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    res = _run_layout(family, sizes, hf_dir, make_batch(), **options)
    teardown_parallel(destroy_process_group=False)
    return res


def _compare(tmp_path, family, sizes, options, ref_options=None, param_tol=TOL):
    from megatron_spo.models.tiny import make_tiny_model_dir

    hf_dir = str(make_tiny_model_dir(tmp_path / family, family, seed=3, tokenizer=False))
    ref = run_distributed(_worker, 1, args=(hf_dir, family, ParallelSizes(), ref_options or {}), timeout=600)[0]
    par = run_distributed(_worker, 2, args=(hf_dir, family, sizes, options), timeout=600)[0]
    assert (par["logp"] - ref["logp"]).abs().max().item() <= TOL
    assert abs(par["loss"] - ref["loss"]) <= TOL
    assert abs(par["grad_norm"] - ref["grad_norm"]) <= TOL
    if par["grads"] is not None:
        assert max((par["grads"][k] - ref["grads"][k]).abs().max().item() for k in ref["grads"]) <= TOL
    moved = max((ref["params"][k] - par["params"][k]).abs().max().item() for k in ref["params"])
    assert moved <= param_tol


def test_sequence_parallel_tp2(tmp_path):
    _compare(tmp_path, "qwen3", ParallelSizes(tp=2, sequence_parallel=True), {})


def test_moe_with_tp2_sequence_parallel_and_ep2(tmp_path):
    _compare(tmp_path, "qwen3_moe", ParallelSizes(tp=2, ep=2, etp=1, sequence_parallel=True), {})


def test_distributed_optimizer_dp2(tmp_path):
    _compare(tmp_path, "qwen3", ParallelSizes(), {"distributed_optimizer": True, "gather_grads": False})


def test_transformer_engine_spec_tp2(tmp_path):
    pytest.importorskip("transformer_engine")
    _compare(tmp_path, "qwen3", ParallelSizes(tp=2), {"use_te": True})


ADAM = {"optimizer": "adam", "lr": 1e-3}


def test_optimizer_cpu_offload_dp2(tmp_path):
    """Adam's state and update on the CPU (HybridDeviceOptimizer, distributed optimizer, DP=2) takes the
    same step as plain Adam on one GPU."""
    _compare(tmp_path, "qwen3", ParallelSizes(),
             {"distributed_optimizer": True, "gather_grads": False, "optim_extra": {**ADAM, "cpu_offload": True}},
             ref_options={"optim_extra": ADAM})


def test_bf16_adam_moments_dp2(tmp_path):
    """Precision-aware optimizer with bf16 moments: the step matches fp32 Adam to bf16 precision."""
    pytest.importorskip("transformer_engine")
    _compare(tmp_path, "qwen3", ParallelSizes(),
             {"distributed_optimizer": True, "gather_grads": False,
              "optim_extra": {**ADAM, "moments_dtype": "bfloat16"}},
             ref_options={"optim_extra": ADAM}, param_tol=1e-5)
