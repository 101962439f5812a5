"""`megatron-spo estimate-values`: subsets written, resumable without re-sampling, merge keeps <= n per key."""

from __future__ import annotations

import argparse
import json
from typing import List

import pytest

from megatron_spo.commands import estimate_values as ev
from megatron_spo.config import RolloutConfig
from megatron_spo.data import load_prompts
from megatron_spo.models.tiny import make_tiny_model_dir
from megatron_spo.rollout.embedded.engine import EmbeddedEngine
from megatron_spo.rollout.phase import RolloutPhase
from megatron_spo.rollout.reward_registry import REWARD_FNS, register_reward


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "qwen3")


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = EmbeddedEngine(str(model_dir), seed=5)
    yield eng
    eng.close()


class CountingEngine:
    """Forwards to the embedded engine and counts generation calls (one per single-turn sample)."""

    name = "counting"

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.max_context = inner.max_context

    @property
    def weight_version(self) -> int:
        return self.inner.weight_version

    async def agenerate(self, prompt, sampling, request_id=None):
        self.calls += 1
        return await self.inner.agenerate(prompt, sampling, request_id)


def first_token_even(response, ground_truth, sample=None, **kw):
    return float(sample.response_ids[0] % 2 == 0)


if "test_estimate_first_token_even" not in REWARD_FNS:  # the CLI takes the reward by registered name
    register_reward("test_estimate_first_token_even")(first_token_even)


# 7 rows, 6 distinct prompts: row 5 repeats row 4's prompt, so that key collects 2n scores in one subset.
ROWS = [{"prompt": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(5)] + \
       [{"prompt": "What is 4 + 2?", "answer": "6"}, {"prompt": "What is 9 + 9?", "answer": "18"}]


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return load_prompts(path)


def make_phase(engine):
    cfg = RolloutConfig(max_response_len=3, temperature=0.6, top_p=0.95, top_k=20)
    return RolloutPhase(engine, engine.inner.tokenizer, cfg, reward=first_token_even, context_len=engine.max_context)


def test_subsets_written_merged_and_resumable(engine, dataset, tmp_path):
    counting = CountingEngine(engine)
    out = tmp_path / "values"
    n = 2
    with make_phase(counting) as phase:
        summary = ev.estimate_values(dataset.records, phase, out, subsets=3, n=n, data_path=dataset.path)
    assert counting.calls == len(ROWS) * n
    assert summary["subsets_sampled"] == [0, 1, 2] and summary["subsets_skipped"] == []
    chunks = ev.split_subsets(dataset.records, 3)
    assert [len(c) for c in chunks] == [2, 2, 3]
    for i, chunk in enumerate(chunks):
        part = json.loads((out / f"subset_{i}.json").read_text())
        assert set(part) == {r.key for r in chunk}
        for key, scores in part.items():
            assert len(scores) == n * sum(r.key == key for r in chunk) and set(scores) <= {0.0, 1.0}
    assert len(json.loads((out / "subset_2.json").read_text())["What is 4 + 2?"]) == 2 * n
    merged = json.loads((out / "offline_values.json").read_text())
    assert set(merged) == set(dataset.keys()) and len(merged) == 6
    assert all(len(v) == n for v in merged.values())  # the repeated prompt is cut from 4 to n = 2
    assert summary["prompts"] == 6 and summary["scores"] == 6 * n and summary["missing_keys"] == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.json")}

    # second run: every subset is done, so nothing is sampled and the merge is the same
    with make_phase(counting) as phase:
        again = ev.estimate_values(dataset.records, phase, out, subsets=3, n=n, data_path=dataset.path)
    assert counting.calls == len(ROWS) * n
    assert again["subsets_sampled"] == [] and again["subsets_skipped"] == [0, 1, 2]
    assert {p.name: p.read_bytes() for p in out.glob("*.json")} == before


def test_interrupted_run_continues_at_the_next_subset(engine, dataset, tmp_path):
    counting = CountingEngine(engine)
    out = tmp_path / "values"

    def stop_after_first(i, metrics):
        raise KeyboardInterrupt  # the run is killed right after subset 0 was written

    with make_phase(counting) as phase, pytest.raises(KeyboardInterrupt):
        ev.estimate_values(dataset.records, phase, out, subsets=3, n=2, on_subset=stop_after_first)
    assert counting.calls == 2 * 2
    assert (out / "subset_0.json").exists() and not (out / "subset_1.json").exists()
    assert not (out / "offline_values.json").exists()
    with make_phase(counting) as phase:
        summary = ev.estimate_values(dataset.records, phase, out, subsets=3, n=2)
    assert counting.calls == 2 * 2 + (2 + 3) * 2  # only subsets 1 and 2 are sampled now
    assert summary["subsets_sampled"] == [1, 2] and summary["subsets_skipped"] == [0]
    assert set(json.loads((out / "offline_values.json").read_text())) == set(dataset.keys())


def test_resume_with_other_inputs_is_refused(engine, dataset, tmp_path):
    out = tmp_path / "values"
    with make_phase(CountingEngine(engine)) as phase:
        ev.estimate_values(dataset.records[:4], phase, out, subsets=2, n=1)
        with pytest.raises(ev.EstimateError, match=r"n: 1 -> 2"):
            ev.estimate_values(dataset.records[:4], phase, out, subsets=2, n=2)
        with pytest.raises(ev.EstimateError, match=r"prompts: 4 -> 5"):
            ev.estimate_values(dataset.records[:5], phase, out, subsets=2, n=1)


def test_too_many_failed_samples_leave_the_subset_unwritten(engine, dataset, tmp_path):
    from megatron_spo.rollout.engine import EngineError

    class Broken(CountingEngine):
        async def agenerate(self, prompt, sampling, request_id=None):
            raise EngineError("connection refused")

    out = tmp_path / "values"
    phase = RolloutPhase(Broken(engine), engine.tokenizer, RolloutConfig(max_response_len=3), reward=first_token_even,
                         max_retries=0)
    with phase, pytest.raises(ev.EstimateError, match=r"subset 0: 4 of 4 samples failed.*connection refused"):
        ev.estimate_values(dataset.records, phase, out, subsets=3, n=2)
    assert not (out / "subset_0.json").exists()


def cli(argv: List[str]) -> int:
    parser = argparse.ArgumentParser()
    ev.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_end_to_end_and_rerun(model_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "ov"
    argv = ["estimate-values", "--set", f"model.path={model_dir}", "--set", f"data.train_path={data}",
            "--set", "rollout.max_response_len=3", "--subsets", "2", "--out", str(out), "--reward",
            "test_estimate_first_token_even", "--no-progress"]
    assert cli(argv) == 0
    first = capsys.readouterr().out
    assert "subsets sampled: [0, 1], already done: []" in first
    merged = json.loads((out / "offline_values.json").read_text())
    assert set(merged) == {r["prompt"] for r in ROWS} and all(len(v) == 8 for v in merged.values())  # n = 8
    assert set(json.loads((out / "manifest.json").read_text())) == {"data", "prompts", "keys_sha256", "subsets", "n"}
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("subset_*.json")}
    assert cli(argv) == 0
    assert "subsets sampled: [], already done: [0, 1]" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("subset_*.json")} == stamps


def test_cli_bad_rows(model_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3] + [{"answer": "1"}]))
    argv = ["estimate-values", "--set", f"model.path={model_dir}", "--data", str(data), "--set",
            "rollout.max_response_len=2", "--subsets", "1", "--n", "1", "--no-progress"]
    assert cli(argv + ["--out", str(tmp_path / "a")]) == 2
    assert "row 3 column 'prompt'" in capsys.readouterr().err
    assert cli(argv + ["--out", str(tmp_path / "b"), "--set", "data.skip_bad_rows=true"]) == 0
    assert len(json.loads((tmp_path / "b" / "offline_values.json").read_text())) == 3
