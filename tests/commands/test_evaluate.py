"""`megatron-spo eval`: metrics against an independent summarize() of the samples, CLI, server URLs, bad input."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import time
from pathlib import Path
from typing import Dict, List

import pytest

from megatron_spo.commands import evaluate
from megatron_spo.config import load_config
from megatron_spo.models.tiny import make_tiny_model_dir
from megatron_spo.rollout.embedded.engine import EmbeddedEngine
from megatron_spo.rollout.embedded.server import ServerThread
from megatron_spo.rollout.engine import GenerateResult, SamplingParams
from megatron_spo.rollout.phase import with_sampling
from megatron_spo.rollout.reward_registry import REWARD_FNS, register_reward
from megatron_spo.trainer.eval_metrics import summarize


def _boxed_equals(response: str, ground_truth) -> float:
    found = re.findall(r"\\boxed\{([^{}]*)\}", response)
    return float(bool(found) and found[-1].strip() == str(ground_truth))


def _even_text_length(response: str, ground_truth) -> float:
    return float(len(response) % 2 == 0)


for _name, _fn in (("test_eval_boxed_equals", _boxed_equals), ("test_eval_even_text_length", _even_text_length)):
    if _name not in REWARD_FNS:
        register_reward(_name)(_fn)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "qwen3")


def write_jsonl(path: Path, rows: List[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROBLEMS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 6), (7, 1), (2, 2))]


class BoxedAnswerEngine:
    """Answers "What is a + b?" with a boxed number drawn from {a+b, a+b+1, a+b+2} (seeded), and logs it."""

    name = "boxed"
    weight_version = 0

    def __init__(self, tok, seed: int = 0):
        self.tok, self.rng, self.emitted = tok, random.Random(seed), []

    async def agenerate(self, prompt, sampling: SamplingParams, request_id=None) -> GenerateResult:
        a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)\?", self.tok.decode(prompt))[-1])
        value = a + b + self.rng.choice([0, 0, 1, 2])
        self.emitted.append((f"What is {a} + {b}?", value))
        ids = self.tok.encode(f"The answer is \\boxed{{{value}}}<|im_end|>", add_special_tokens=False)
        await asyncio.sleep(0)
        return GenerateResult(ids, [-1.0] * len(ids), "stop", 0, len(prompt))


def test_eval_numbers_equal_summarize_of_the_samples(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "arith.jsonl", PROBLEMS)
    cfg = load_config(overrides=[f"model.path={model_dir}", "rollout.max_response_len=32"])
    cfg.rollout = with_sampling(cfg.rollout, temperature=0.6, top_p=0.95, top_k=20)
    eng = BoxedAnswerEngine(EmbeddedEngine._load_tokenizer(str(model_dir)))
    report = evaluate.run_eval(cfg, [str(data)], k=4, reward="test_eval_boxed_equals", out_dir=str(tmp_path / "out"),
                               engine=eng, progress=False)
    # independent: what the engine emitted, grouped per problem
    per: Dict[str, List[int]] = {}
    for key, value in eng.emitted:
        per.setdefault(key, []).append(value)
    assert sorted(per) == sorted(p["prompt"] for p in PROBLEMS) and all(len(v) == 4 for v in per.values())
    truth = {p["prompt"]: int(p["answer"]) for p in PROBLEMS}
    correct = [[float(v == truth[key]) for v in values] for key, values in per.items()]
    answers = [[str(v) for v in values] for values in per.values()]
    expected = summarize(correct, answers, [1, 2, 4])
    got = report["benchmarks"]["arith"]
    for name in ("avg@4", "maj@4", "pass@1", "pass@2", "pass@4", "problems"):
        assert got[name] == pytest.approx(expected[name]), name
    assert got["samples"] == 20 and got["errors"] == 0
    assert 0 < got["avg@4"] < 1  # the seeded draws give a mix of right and wrong answers
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["benchmarks"]["arith"] == got
    assert saved["settings"]["temperature"] == 0.6 and saved["settings"]["top_p"] == 0.95
    assert saved["settings"]["top_k"] == 20 and saved["settings"]["pass_ks"] == [1, 2, 4]
    table = (tmp_path / "out" / "eval.txt").read_text()
    assert table.splitlines()[0].split() == ["benchmark", "avg@4", "maj@4", "pass@1", "pass@2", "pass@4"]
    assert table.splitlines()[1].split()[:2] == ["arith", f"{expected['avg@4']:.4f}"]
    lines = [json.loads(x) for x in (tmp_path / "out" / "eval_samples.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and {x["answer"] for x in lines} <= {str(v) for _, v in eng.emitted}


def cli(argv: List[str]) -> int:
    parser = argparse.ArgumentParser()
    evaluate.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def recompute(out: Path, rows: List[dict], k: int) -> Dict[str, float]:
    """summarize() over the stored responses, with the test's own reward rule and answer extraction."""
    lines = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    keys = [r["prompt"] for r in rows]
    correct, answers = [], []
    for key in keys:
        mine = sorted((x for x in lines if x["key"] == key), key=lambda x: x["sample"])
        assert len(mine) == k
        correct.append([float(len(x["response"]) % 2 == 0) for x in mine])
        answers.append([(re.findall(r"\\boxed\{([^{}]*)\}", x["response"]) or [None])[-1] for x in mine])
    ks = [1, 2, 3] if k == 3 else [1, 2]
    return summarize(correct, answers, ks)


def test_cli_with_the_embedded_engine(model_dir, tmp_path, capsys):
    rows = PROBLEMS[:3]
    data = write_jsonl(tmp_path / "bench.jsonl", rows)
    out = tmp_path / "out"
    rc = cli(["eval", "--set", f"model.path={model_dir}", "--set", "rollout.max_response_len=6", "--data", str(data),
              "--k", "3", "--reward", "test_eval_even_text_length", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    got = report["benchmarks"]["bench"]
    expected = recompute(out, rows, 3)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name
    assert report["settings"]["temperature"] == 0.6 and report["settings"]["top_k"] == 20
    assert report["rollout"]["bench"]["rollout/samples"] == 9
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].split()[0] == "benchmark" and "bench" in stdout and "eval.json" in stdout


def test_cli_with_a_server_url(model_dir, tmp_path):
    rows = PROBLEMS[:2]
    data = write_jsonl(tmp_path / "b.jsonl", rows)
    server_engine = EmbeddedEngine(str(model_dir))
    try:
        with ServerThread(server_engine) as url:
            rc = cli(["eval", "--set", f"model.path={model_dir}", "--set", "rollout.engine=sglang",
                      "--set", f"rollout.urls=[{url}]", "--set", "rollout.max_response_len=5", "--data", str(data),
                      "--k", "2", "--reward", "test_eval_even_text_length", "--out", str(tmp_path / "o"),
                      "--no-progress", "--set", "rollout.eval_temperature=0.7", "--top-k", "5"])
    finally:
        server_engine.close()
    assert rc == 0
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert report["settings"]["urls"] == [url] and report["benchmarks"]["b"]["errors"] == 0
    # sampling: the config's eval_* settings, each overridable by its flag
    assert (report["settings"]["temperature"], report["settings"]["top_p"], report["settings"]["top_k"]) == (0.7, 0.95, 5)
    expected = recompute(tmp_path / "o", rows, 2)
    for name, value in expected.items():
        assert report["benchmarks"]["b"][name] == pytest.approx(value), name


def test_two_server_urls_share_the_requests(model_dir, tmp_path):
    rows = PROBLEMS[:3]
    data = write_jsonl(tmp_path / "b.jsonl", rows)
    engines = [EmbeddedEngine(str(model_dir)), EmbeddedEngine(str(model_dir))]
    servers = [ServerThread(e) for e in engines]
    try:
        urls = [s.start() for s in servers]
        rc = cli(["eval", "--set", f"model.path={model_dir}", "--set", "rollout.engine=sglang",
                  "--set", f"rollout.urls=[{urls[0]}, {urls[1]}]", "--set", "rollout.max_response_len=4",
                  "--data", str(data), "--k", "2", "--reward", "test_eval_even_text_length",
                  "--out", str(tmp_path / "o"), "--no-progress"])
    finally:
        for s in servers:
            s.stop()
        for e in engines:
            e.close()
    assert rc == 0
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert report["benchmarks"]["b"]["samples"] == 6 and report["benchmarks"]["b"]["errors"] == 0
    # least-loaded routing: six concurrent requests land on both servers
    assert all(e.tokens_generated > 0 for e in engines)
    assert sum(e.tokens_generated for e in engines) == report["rollout"]["b"]["rollout/tokens_generated"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_a_clear_error_without_hanging(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "b.jsonl", PROBLEMS[:1])
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    rc = cli(["eval", "--set", f"model.path={model_dir}", "--set", "rollout.engine=vllm", "--set",
              f"rollout.urls=[{url}]", "--data", str(data), "--k", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not reachable" in err and url in err
    assert time.monotonic() - start < 60  # bounded by the health probe's timeout, not a hang
    assert not (tmp_path / "o" / "eval.json").exists()


def test_bad_rows_name_the_row_or_are_counted_when_skipping(model_dir, tmp_path, capsys):
    rows = PROBLEMS[:2] + [{"prompt": "What is 9 + 9?"}]  # no answer field
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    base = ["eval", "--set", f"model.path={model_dir}", "--set", "rollout.max_response_len=4", "--data", str(data),
            "--k", "2", "--reward", "test_eval_even_text_length", "--no-progress"]
    assert cli(base + ["--out", str(tmp_path / "a")]) == 2
    assert "row 2: column 'answer' is empty" in capsys.readouterr().err
    assert cli(base + ["--out", str(tmp_path / "b"), "--set", "data.skip_bad_rows=true"]) == 0
    got = json.loads((tmp_path / "b" / "eval.json").read_text())["benchmarks"]["bad"]
    assert got["problems"] == 2 and got["skipped_rows"] == 1
    # over-long prompt: an error naming the row, or a counted skip
    long_rows = PROBLEMS[:1] + [{"prompt": "plus " * 60, "answer": "1"}]
    data = write_jsonl(tmp_path / "long.jsonl", long_rows)
    base = ["eval", "--set", f"model.path={model_dir}", "--set", "data.max_prompt_len=40", "--set",
            "rollout.max_response_len=4", "--data", str(data), "--k", "1", "--reward", "test_eval_even_text_length",
            "--no-progress"]
    assert cli(base + ["--out", str(tmp_path / "c")]) == 2
    assert "row 1 (prompt 'plus plus" in capsys.readouterr().err
    assert cli(base + ["--out", str(tmp_path / "d"), "--set", "data.skip_bad_rows=true"]) == 0
    got = json.loads((tmp_path / "d" / "eval.json").read_text())["benchmarks"]["long"]
    assert got["problems"] == 1 and got["skipped_rows"] == 1
