"""Prompt datasets: formats, nested columns, prompt keys, bad rows named or counted, length limits."""

from __future__ import annotations

import json

import pytest

from megatron_spo.data import DataError, load_prompts, prompt_key_of, to_messages, tokenize_prompt
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
