"""Packing on 2 gloo processes: in every parallel layout, packed == padded (the same layout) within 1e-6.

Layouts: TP=2, PP=2 (variable shapes), DP=2 for Qwen3; PP=2 x VPP=2 (the interleaved schedule:
fixed packed shapes, a count that is a multiple of pp) for a 4-layer Qwen3; PP=2 for tied-embedding
Llama; EP=2 (dense DP=2, alltoall dispatcher) for Qwen3-MoE. Each layout runs the padded and the
packed actor on the same HF weights and batch (``test_packing.run_actor``) and compares log-probs,
loss, grad norm, every gathered gradient and every parameter after one clipped SGD step.
"""

from __future__ import annotations

import pytest
from test_actor_parallel import model_dirs  # noqa: F401 - the same tiny HF checkpoints (a fixture)

from megatron_spo.megatron.launch import run_distributed
from megatron_spo.megatron.parallel import ParallelSizes

TOL = 1e-6

LAYOUTS = [
    ("qwen3", ParallelSizes(tp=2)),
    ("qwen3", ParallelSizes(pp=2)),
    ("qwen3", ParallelSizes()),  # DP=2
    ("qwen3_vpp", ParallelSizes(pp=2, vpp=2)),
    ("llama", ParallelSizes(pp=2)),
    ("qwen3_moe", ParallelSizes(ep=2, etp=1)),
]


def _worker(dirs, batch):
    from test_packing import diffs, run_actor

    from megatron_spo.megatron.parallel import teardown_parallel

    out = []
    for family, sizes in LAYOUTS:
        padded = run_actor(family, sizes, dirs[family], batch, packing_on=False, micro_batch_tokens=40)
        packed = run_actor(family, sizes, dirs[family], batch, packing_on=True, micro_batch_tokens=40)
        out.append((family, sizes, diffs(padded, packed), (padded["computed"], packed["computed"])))
    teardown_parallel(destroy_process_group=False)
    return out


@pytest.fixture(scope="module")
def results(model_dirs):  # noqa: F811 - the imported fixture
    from test_actor_parallel import make_batch

    return run_distributed(_worker, 2, args=(model_dirs, make_batch(n_rows=8)), timeout=900)


def test_packed_equals_padded_in_every_parallel_layout(results):
    for rank_out in results:
        assert len(rank_out) == len(LAYOUTS)
        for family, sizes, d, computed in rank_out:
            where = f"{family} {sizes}"
            print(where, d, computed)
            for name, value in d.items():
                assert value <= TOL, (where, name, value)
