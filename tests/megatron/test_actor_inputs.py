"""Bad input gives clear errors naming the value; micro-batching by token budget; the launcher; CPU shims.

Everything here runs in the pytest process without touching torch.distributed or the CPU shims,
except the launcher/shim tests, which run in spawned children.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_spo.megatron import batching
from megatron_spo.megatron.launch import DistributedError, run_distributed
from megatron_spo.megatron.model import UnsupportedArchitectureError, load_hf_config, model_family
from megatron_spo.megatron.parallel import ParallelSizes, validate_parallel_sizes
from megatron_spo.models.tiny import tiny_config


# ---------------------------------------------------------------------------------------------
# parallel sizes vs world size and model
# ---------------------------------------------------------------------------------------------
def test_valid_layouts_give_the_data_parallel_size():
    moe = tiny_config("qwen3_moe").to_dict()  # 4 heads, 2 KV heads, 2 layers, 4 experts
    assert validate_parallel_sizes(ParallelSizes(), 4, moe) == 4
    assert validate_parallel_sizes(ParallelSizes(tp=2), 4, moe) == 2
    assert validate_parallel_sizes(ParallelSizes(pp=2, ep=2, etp=1), 4, moe) == 2
    assert validate_parallel_sizes(ParallelSizes(ep=4, etp=1), 4, moe) == 4


@pytest.mark.parametrize("sizes, world, pattern", [
    (ParallelSizes(tp=4), 4, r"tp=4 does not divide num_key_value_heads=2"),
    (ParallelSizes(tp=3), 3, r"tp=3 does not divide num_attention_heads=4"),
    (ParallelSizes(pp=4), 4, r"pp\*vpp=4\*1 does not divide num_hidden_layers=2"),
    (ParallelSizes(ep=3, etp=1), 3, r"ep=3 does not divide num_experts=4"),
    (ParallelSizes(tp=2), 3, r"world_size=3 is not divisible by tp\*cp\*pp=2\*1\*1"),
    (ParallelSizes(ep=2, etp=2), 2, r"world_size=2 is not divisible by etp\*ep\*pp=2\*2\*1"),
    (ParallelSizes(tp=0), 2, r"tp=0 must be a positive integer"),
    (ParallelSizes(vpp=2), 2, r"vpp=2 needs pp > 1"),
])
def test_bad_parallel_sizes_name_the_value(sizes, world, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_parallel_sizes(sizes, world, tiny_config("qwen3_moe").to_dict())


def test_expert_parallel_on_a_dense_model_is_refused():
    with pytest.raises(ValueError, match=r"ep=2 but the model has no experts"):
        validate_parallel_sizes(ParallelSizes(ep=2, etp=1), 2, tiny_config("qwen3").to_dict())


# ---------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------
def test_supported_families_are_recognised(tmp_path):
    for family in ("qwen3", "qwen3_moe", "llama"):
        assert model_family(tiny_config(family).to_dict()) == family
    cfg = tiny_config("llama").to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(__import__("json").dumps(cfg))
    assert model_family(load_hf_config(tmp_path)) == "llama"


@pytest.mark.parametrize("cfg, pattern", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, r"'MistralForCausalLM'"),
    ({"model_type": "gpt2"}, r"model_type 'gpt2'"),
])
def test_unsupported_architecture_is_named(cfg, pattern):
    with pytest.raises(UnsupportedArchitectureError, match=pattern):
        model_family(cfg)


def test_missing_config_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_config(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# batches and micro-batching
# ---------------------------------------------------------------------------------------------
def _batch(lengths, width=None):
    lengths = torch.tensor(lengths)
    width = width or int(lengths.max())
    ar = torch.arange(width).unsqueeze(0)
    return {"input_ids": torch.zeros(len(lengths), width, dtype=torch.long), "lengths": lengths,
            "loss_mask": ((ar >= 1) & (ar < lengths.unsqueeze(1))).float()}


def test_sequence_longer_than_max_positions_is_named():
    with pytest.raises(ValueError, match=r"sequence 1 has length 300 > the model's max positions 256"):
        batching.validate_batch(_batch([10, 300]), max_positions=256)


def test_empty_batch_and_empty_micro_batch_are_refused():
    with pytest.raises(ValueError, match="empty batch"):
        batching.validate_batch({
            "input_ids": torch.zeros(0, 4, dtype=torch.long), "lengths": torch.zeros(0, dtype=torch.long),
            "loss_mask": torch.zeros(0, 4)})
    with pytest.raises(ValueError, match="micro-batch 1 is empty"):
        batching.make_micro_batches(_batch([3, 4]), [[0, 1], []])
    with pytest.raises(ValueError, match="cannot make 3 non-empty micro-batches from 2 sequences"):
        batching.balance_to_count([3, 4], 3)


def test_bad_masks_and_lengths_are_named():
    b = _batch([4, 6])
    b["loss_mask"][1, 0] = 1
    with pytest.raises(ValueError, match=r"loss_mask\[1, 0\] is set"):
        batching.validate_batch(b)
    b = _batch([4, 6])
    b["loss_mask"][0, 5] = 1
    with pytest.raises(ValueError, match="loss_mask of row 0 marks tokens past its length 4"):
        batching.validate_batch(b)
    b = _batch([4, 6])
    b["lengths"][0] = 0
    with pytest.raises(ValueError, match=r"lengths\[0\]=0 is outside \[1, T=6\]"):
        batching.validate_batch(b)
    b = _batch([4, 6])
    b["old_logp"] = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"old_logp must be \[B, T\]=\(2, 6\), got \(2, 5\)"):
        batching.validate_batch(b)


def test_token_budget_split_respects_budget_and_keeps_every_row_once():
    lengths = [24, 11, 17, 8, 20, 13, 24, 9, 5, 30]
    groups = batching.split_by_token_budget(lengths, 48)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        cost = len(g) * max(lengths[i] for i in g)
        assert cost <= 48 or len(g) == 1  # an over-long row gets a micro-batch of its own
    assert [30] == [lengths[i] for i in groups[0]]  # longest first, alone (2 x 30 > 48)
    # Exactly `count` micro-batches, balanced, every row once.
    for count in (1, 3, 10):
        groups = batching.balance_to_count(lengths, count)
        assert len(groups) == count and all(groups)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))


def test_micro_batches_are_trimmed_and_scatter_back():
    b = _batch([3, 7, 5], width=9)
    b["input_ids"] = torch.arange(27).view(3, 9)
    mbs = batching.make_micro_batches(b, [[1], [2, 0]])
    assert mbs[0]["input_ids"].shape == (1, 7) and mbs[1]["input_ids"].shape == (2, 5)
    assert torch.equal(mbs[1]["position_ids"][1], torch.arange(5))
    back = batching.scatter_rows([mb["input_ids"] for mb in mbs], mbs, (3, 9))
    expected = b["input_ids"].clone()
    expected[0, 5:] = 0
    expected[1, 7:] = 0
    expected[2, 5:] = 0
    assert torch.equal(back, expected)


def test_data_parallel_sharding_is_contiguous_and_checked():
    b = _batch([3, 4, 5, 6])
    assert batching.shard_for_data_parallel(b, 1, 2)["lengths"].tolist() == [5, 6]
    with pytest.raises(ValueError, match="4 sequences is not divisible by data-parallel size 3"):
        batching.shard_for_data_parallel(b, 0, 3)


# ---------------------------------------------------------------------------------------------
# launcher and CPU shims (spawned children: the pytest process stays unpatched)
# ---------------------------------------------------------------------------------------------
def _rank_sum(offset):
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "sum": t.item(), "env": os.environ["WORLD_SIZE"]}


def _fails_on_rank_1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    return "ok"


def _sleeps():
    import time

    time.sleep(60)


def test_launcher_returns_results_and_propagates_child_tracebacks():
    assert run_distributed(_rank_sum, 2, args=(10,), timeout=120) == [
        {"rank": 0, "sum": 21.0, "env": "2"}, {"rank": 1, "sum": 21.0, "env": "2"}]
    with pytest.raises(DistributedError, match=r"(?s)rank 1 of 2 failed in _fails_on_rank_1.*ValueError: boom on purpose"):
        run_distributed(_fails_on_rank_1, 2, timeout=120)
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish within 3 s"):
        run_distributed(_sleeps, 1, timeout=3, init_process_group=False)


def _shim_child():
    from megatron_spo.megatron.cpu import apply_cpu_shims

    first, second = apply_cpu_shims(), apply_cpu_shims()
    # The same objects megatron calls now work on CPU.
    from megatron.core import tensor_parallel

    out = {"first": first, "second": second, "device": torch.cuda.current_device(),
           "zeros_device": str(torch.zeros(2, device="cuda").device)}
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    with tracker.fork():
        b = torch.rand(3)
    out["fork_restores_default_rng"] = bool(torch.equal(before, torch.get_rng_state()))
    out["fork_stream_advances"] = not torch.equal(a, b)
    parallel_state.destroy_model_parallel()
    return out


def test_cpu_shims_are_idempotent_and_make_megatron_cuda_calls_work():
    out = run_distributed(_shim_child, 1, timeout=180)[0]
    assert out["first"] is True and out["second"] is True
    assert out["device"] == "cpu" and out["zeros_device"] == "cpu"
    assert out["fork_restores_default_rng"] and out["fork_stream_advances"]


def test_pytest_process_is_not_patched():
    # The shims never leak into a process that did not ask for them (here: the test runner).
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_sequence_parallel_width_rounding_pads_with_masked_zeros():
    b = _batch([3, 7], width=7)
    b["input_ids"] = torch.arange(1, 15).view(2, 7)
    (mb,) = batching.make_micro_batches(b, [[0, 1]], width_multiple=4)
    assert mb["input_ids"].shape == (2, 8)
    assert mb["input_ids"][:, 7].tolist() == [0, 0] and mb["loss_mask"][:, 7].tolist() == [0.0, 0.0]
    back = batching.scatter_rows([mb["input_ids"]], [mb], (2, 7))
    assert torch.equal(back[1], b["input_ids"][1])
