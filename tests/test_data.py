"""Prompt datasets: formats, nested columns, prompt keys, bad rows named or counted, length limits, answers
kept as written, malformed lines named by file:line, blank lines, every prompt measured at start."""

from __future__ import annotations

import json
import logging

import pytest

from megatron_spo.data import (
    DataError, check_prompt_lengths, load_prompts, prompt_key_of, to_messages, tokenize_prompt,
)
from megatron_spo.models.tiny import make_tiny_tokenizer


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_parquet_and_saved_dir_give_the_same_records(tmp_path):
    import datasets

    rows = [{"prompt": " What is 1+1? ", "answer": "2"}, {"prompt": "What is 2+3?", "answer": 5}]
    a = load_prompts(_jsonl(tmp_path / "p.jsonl", rows))
    datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows]).to_parquet(
        str(tmp_path / "p.parquet"))
    b = load_prompts(tmp_path / "p.parquet")
    datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows]).save_to_disk(
        str(tmp_path / "saved"))
    c = load_prompts(tmp_path / "saved")
    for ds in (a, b, c):
        assert ds.keys() == ["What is 1+1?", "What is 2+3?"]
        assert [r.answer for r in ds.records] == ["2", "5"]
        assert ds[0].messages == [{"role": "user", "content": " What is 1+1? "}]


def test_chat_messages_and_nested_answer_column(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q1 "}],
             "reward_model": {"ground_truth": "7"}}]
    ds = load_prompts(_jsonl(tmp_path / "dapo.jsonl", rows), answer_key="reward_model.ground_truth")
    assert ds[0].key == "Q1" and ds[0].answer == "7" and len(ds[0].messages) == 2


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "", "answer": "1"}, "row 1 column 'prompt' is empty"),
        ({"prompt": "Q", "answer": ""}, "row 1: column 'answer' is empty"),
        ({"prompt": "Q", "answer": None}, "row 1: column 'answer' is empty"),
        ({"prompt": [{"role": "system", "content": "x"}], "answer": "1"}, "row 1 column 'prompt' has no user message"),
        ({"prompt": [{"role": "user"}], "answer": "1"}, "message 0 must have string 'role' and 'content'"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "answer": "1"}, row])
    with pytest.raises(DataError) as err:
        load_prompts(path)
    assert message in str(err.value) and "bad.jsonl" in str(err.value)


def test_skip_bad_rows_counts_them(tmp_path):
    path = _jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "", "answer": "2"},
                                              {"prompt": "c", "answer": ""}, {"prompt": "d", "answer": "4"}])
    ds = load_prompts(path, skip_bad_rows=True)
    assert ds.keys() == ["a", "d"] and [r.index for r in ds.records] == [0, 3]
    assert sorted(ds.skipped) == [1, 2]


def test_missing_file_column_and_format(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "1"}])
    with pytest.raises(DataError, match=r"no prompt column 'prompt'; columns: \['answer', 'question'\]"):
        load_prompts(path)
    assert load_prompts(path, prompt_key="question")[0].key == "a"
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_prompts(tmp_path / "x.txt")
    with pytest.raises(DataError, match="is not a `datasets` save_to_disk directory"):
        load_prompts(tmp_path)
    empty = _jsonl(tmp_path / "empty.jsonl", [{"prompt": "", "answer": "1"}])
    with pytest.raises(DataError, match="no usable rows"):
        load_prompts(empty, skip_bad_rows=True)


def test_prompt_key_ignores_system_and_later_turns():
    msgs = to_messages([{"role": "system", "content": "s"}, {"role": "user", "content": "  Q  "},
                        {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}])
    assert prompt_key_of(msgs) == "Q"
    assert prompt_key_of(to_messages("  Q\n")) == "Q"


def test_tokenize_prompt_uses_the_chat_template_and_checks_length():
    tok = make_tiny_tokenizer()
    msgs = to_messages("What is 2 + 3?")
    ids = tokenize_prompt(tok, msgs, max_len=100)
    assert tok.decode(ids) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(DataError, match=f"row 4: prompt is {len(ids)} tokens, longer than data.max_prompt_len=5"):
        tokenize_prompt(tok, msgs, max_len=5, where="row 4")


# -- answers as written, lines named, blank lines, rows checked before the model is built ----------------

def test_jsonl_answers_are_kept_exactly_as_written_and_types_do_not_mix(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "a", "answer": 5}\n{"prompt": "b", "answer": 2.50}\n{"prompt": "c", "answer": "7"}\n'
                    '{"prompt": "d", "answer": 1e3}\n{"prompt": "e", "answer": -0}\n'
                    '{"prompt": "f", "answer": 12345678901234567890}\n'
                    '{"prompt": "g", "reward_model": {"ground_truth": 3}, "answer": 0.1}\n')
    ds = load_prompts(path)
    assert [r.answer for r in ds.records] == ["5", "2.50", "7", "1e3", "-0", "12345678901234567890", "0.1"]
    assert load_prompts(path, answer_key="reward_model.ground_truth", skip_bad_rows=True)[0].answer == "3"
    whole = tmp_path / "rows.json"   # one JSON array, and the columnar form `datasets` also reads
    whole.write_text('[{"prompt": "a", "answer": 5},\n {"prompt": "b", "answer": 2.0}]')
    assert [r.answer for r in load_prompts(whole).records] == ["5", "2.0"]
    whole.write_text('{"prompt": ["a", "b"], "answer": [5, "x"]}')
    assert [(r.key, r.answer) for r in load_prompts(whole).records] == [("a", "5"), ("b", "x")]


def test_csv_answers_are_text_as_written(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,answer\nQ1,5\nQ2,0.50\nQ3,None\n"Q,4",1e3\n')
    assert [r.answer for r in load_prompts(path).records] == ["5", "0.50", "None", "1e3"]
    path.write_text("prompt,answer\nQ1,5\nQ2,\n")
    with pytest.raises(DataError, match="row 1: column 'answer' is empty"):
        load_prompts(path)


def test_malformed_line_names_file_and_line_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('\n{"prompt": "a", "answer": 1}\n   \n{"prompt": "b" "answer": 2}\n{"prompt": "c", "answer": 3}\n')
    with pytest.raises(DataError) as err:
        load_prompts(path)
    assert str(err.value) == f"{path}:4: not valid JSON (Expecting ',' delimiter, column 16)"
    path.write_text('{"prompt": "a", "answer": 1}\n\n\n{"prompt": "c", "answer": 3}\n\n')   # blank lines anywhere
    ds = load_prompts(path)
    assert ds.keys() == ["a", "c"] and [(r.index, r.line) for r in ds.records] == [(0, 1), (1, 4)]
    path.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "", "answer": 2}\n')
    with pytest.raises(DataError, match=r"bad.jsonl' line 3: row 1 column 'prompt' is empty"):
        load_prompts(path)
    path.write_text('{"prompt": "a", "answer": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: a row must be a JSON object, got list"):
        load_prompts(path)


def test_skip_bad_rows_lists_each_skipped_row_once_and_leaves_it_out(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer": 2\n\n{"prompt": "", "answer": 3}\n'
                    '{"prompt": "d", "answer": 4}\n')
    with caplog.at_level(logging.WARNING, logger="megatron_spo.data"):
        ds = load_prompts(path, skip_bad_rows=True)
    assert ds.keys() == ["a", "d"] and sorted(ds.skipped) == [1, 2]
    assert ds.skipped[1].startswith(f"{path}:2: not valid JSON")
    assert ds.skipped[2] == f"dataset {str(path)!r} line 4: row 2 column 'prompt' is empty"
    assert len(caplog.records) == 1 and "skipped 2 row(s)" in caplog.text
    assert all(message in caplog.text for message in ds.skipped.values())


def _lengths(tok):
    return lambda messages: len(tokenize_prompt(tok, messages, max_len=10 ** 9))


def test_prompt_lengths_are_checked_for_every_row(tmp_path, caplog):
    tok = make_tiny_tokenizer()
    long_q = "What is " + " + ".join(["1"] * 40) + "?"
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": long_q, "answer": "40"},
                                         {"prompt": "What is 2+2?", "answer": "4"}])
    ds = load_prompts(path)
    n = _lengths(tok)(ds[1].messages)
    with pytest.raises(DataError) as err:
        check_prompt_lengths(ds, _lengths(tok), 40)
    assert str(err.value) == (f"dataset {str(path)!r} row 1, line 2 (prompt {long_q[:60]!r}): prompt is {n} tokens, "
                              f"longer than data.max_prompt_len=40; set data.skip_bad_rows=true to skip such rows")
    with caplog.at_level(logging.WARNING, logger="megatron_spo.data"):
        kept = check_prompt_lengths(ds, _lengths(tok), 40, skip_bad_rows=True)
    assert kept.keys() == ["What is 1+1?", "What is 2+2?"] and list(kept.skipped) == [1]
    assert len(caplog.records) == 1 and f"prompt is {n} tokens" in caplog.text
    assert check_prompt_lengths(ds, _lengths(tok), n) is ds        # nothing too long: the same dataset
    with pytest.raises(DataError, match="has no usable rows: every prompt is longer"):
        check_prompt_lengths(ds, _lengths(tok), 2, skip_bad_rows=True)


def test_train_prompts_are_measured_as_the_agent_loop_renders_them(tmp_path):
    from megatron_spo.config import Config, ConfigError
    from megatron_spo.models.tiny import make_tiny_model_dir
    from megatron_spo.rollout.prompt_length import load_train_prompts

    model = make_tiny_model_dir(tmp_path / "model", "qwen3", seed=0)
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1+1?", "answer": 2}])
    cfg = Config()
    cfg.model.path, cfg.data.train_path, cfg.data.max_prompt_len = str(model), str(path), 64
    ds, tok = load_train_prompts(cfg)
    assert ds[0].answer == "2" and tok.eos_token == "<|im_end|>"
    cfg.rollout.agent = "spo_code"                     # the SPO tool instruction makes the same prompt long
    with pytest.raises(DataError, match=r"row 0, line 1 \(prompt 'What is 1\+1\?'\): prompt is \d+ tokens"):
        load_train_prompts(cfg)
    cfg.model.path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing': no HF config.json there"):
        load_train_prompts(cfg)
    cfg.model.path = ""
    with pytest.raises(ConfigError, match="model.path and data.train_path must be set"):
        load_train_prompts(cfg)


@pytest.mark.slow
def test_trainer_reports_an_over_long_prompt_before_building_the_model(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from megatron_spo.models.tiny import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model", "qwen3", seed=0)
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1+1?", "answer": 2},
                                         {"prompt": "What is " + "1 + " * 30 + "1?", "answer": 31}])
    args = [sys.executable, "-m", "megatron_spo.train", "--set", f"model.path={model}", "--set",
            f"data.train_path={data}", "--set", "data.max_prompt_len=40", "--set", f"io.run_dir={tmp_path / 'run'}"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: dataset {str(data)!r} row 1, line 2 (prompt ")
    assert "longer than data.max_prompt_len=40" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "config.yaml").exists()   # nothing was built
