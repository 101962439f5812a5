"""THD packing on the Transformer Engine path (GPU only; skipped without CUDA and TE).

On the TE spec the packed actor feeds one ``[1, T]`` row per micro-batch with
``PackedSeqParams(qkv_format="thd", cu_seqlens)``; it must equal the padded TE actor like the local
spec's block-diagonal mask does on CPU (test_packing.py). Written for a machine with CUDA devices and
transformer-engine; tolerances are the GPU tests' (TF32 off, cuBLAS/flash reduction order).
"""

from __future__ import annotations

import pytest
import torch

from megatron_spo.megatron.launch import run_distributed
from megatron_spo.megatron.parallel import ParallelSizes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = 1e-4


def _worker(hf_dir, family, sizes):
    from test_actor_parallel import make_batch
    from test_packing import diffs, run_actor

    from megatron_spo.megatron.parallel import teardown_parallel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    batch = make_batch(n_rows=8)
    padded = run_actor(family, sizes, hf_dir, batch, packing_on=False, micro_batch_tokens=40, use_te=True)
    packed = run_actor(family, sizes, hf_dir, batch, packing_on=True, micro_batch_tokens=40, use_te=True)
    teardown_parallel(destroy_process_group=False)
    return diffs(padded, packed), (padded["computed"], packed["computed"])


def _check(tmp_path, family, sizes, world):
    pytest.importorskip("transformer_engine")
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices")
    from megatron_spo.models.tiny import make_tiny_model_dir

    hf_dir = str(make_tiny_model_dir(tmp_path / family, family, seed=3, tokenizer=False))
    d, (padded, packed) = run_distributed(_worker, world, args=(hf_dir, family, sizes), timeout=600)[0]
    assert packed < padded
    assert max(d.values()) <= TOL, d


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_thd_packing_equals_padded_on_one_gpu(tmp_path, family):
    _check(tmp_path, family, ParallelSizes(), 1)


def test_thd_packing_with_tp2_sequence_parallel(tmp_path):
    _check(tmp_path, "qwen3", ParallelSizes(tp=2, sequence_parallel=True), 2)


def test_thd_packing_with_pp2(tmp_path):
    _check(tmp_path, "qwen3", ParallelSizes(pp=2), 2)
