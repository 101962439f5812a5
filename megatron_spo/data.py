"""Prompt datasets: loading, row validation, stable prompt keys, tokenisation and prompt lengths.

A row holds a prompt (a string, or a list of chat messages ``{"role", "content"}``) and a reference
answer. Column names are configurable; a dotted name reaches into nested columns (DAPO-style
``reward_model.ground_truth``). Every problem is reported with the file and row index (and, for JSON
files, the line); with ``skip_bad_rows`` bad rows are listed once in the log and left out of the
dataset instead of stopping the run.

JSON and JSON-lines files are read here, row by row, not through ``datasets``: Arrow gives a column
one type, so an integer answer next to a float came back as ``"5.0"`` and one malformed or blank line
made the whole file unreadable. An answer is kept exactly as the file wrote it (``5``, ``0.50``,
``1e3``); a blank line is skipped; a malformed line is an error naming ``file`` and line (a bad row
with ``skip_bad_rows``). Parquet and ``save_to_disk`` directories go through ``datasets`` (their
columns are typed); CSV does too, with every column read as text, so ``0.50`` stays ``0.50``.

The prompt key that SPO's value tracker and the offline-values file share is the stripped content
of the first user message (docs/algorithms.md §1.2), so it does not depend on the chat template or system prompt.

:func:`check_prompt_lengths` measures every prompt as the rollout will send it, so that an over-long
prompt is found when the run starts, not when it is first sampled.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

log = logging.getLogger(__name__)

Messages = List[Dict[str, str]]

_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_LISTED = 20  # skipped rows named in the log; the rest are counted


class DataError(ValueError):
    """A dataset file or row is unusable; the message names the file and the row index or column."""


@dataclass
class PromptRecord:
    """One validated dataset row.

    Attributes:
        index: row index in the source file (blank lines of a JSON-lines file are not rows).
        messages: the prompt as chat messages (a plain string becomes one user message).
        answer: the reference answer as a string, as the file wrote it.
        key: stable prompt key (stripped content of the first user message).
        line: 1-based line of the row in a JSON-lines file (None for other formats).
    """

    index: int
    messages: Messages
    answer: str
    key: str
    line: Optional[int] = field(default=None, compare=False)

    def where(self) -> str:
        """``row N`` or ``row N, line L``, for messages."""
        return f"row {self.index}" if self.line is None else f"row {self.index}, line {self.line}"


@dataclass
class PromptDataset:
    """Validated rows of one file, plus what was skipped (only with ``skip_bad_rows``)."""

    path: str
    records: List[PromptRecord]
    skipped: Dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PromptRecord:
        return self.records[i]

    def keys(self) -> List[str]:
        return [r.key for r in self.records]


class _AsWritten:
    """A JSON number that keeps its text: ``str()`` gives what the file wrote (``5``, ``0.50``, ``1e3``)."""

    def __new__(cls, text: str):
        obj = super().__new__(cls, text)
        obj.text = text
        return obj

    def __str__(self) -> str:
        return self.text

    def __reduce__(self):
        return type(self), (self.text,)


class _Int(_AsWritten, int):
    """A JSON integer, as written."""


class _Float(_AsWritten, float):
    """A JSON number with a fraction or exponent (or NaN / Infinity), as written."""


_DECODER = json.JSONDecoder(parse_int=_Int, parse_float=_Float, parse_constant=_Float)

# A row as read: (line in a JSON-lines file or None, the row dict -- or the DataError of a malformed line,
# raised when that row is validated, so that ``skip_bad_rows`` can skip it like any bad row).
Row = Tuple[Optional[int], Any]


def _json_lines(p: Path, text: str) -> List[Row]:
    rows: List[Row] = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            value = _DECODER.decode(line)
        except json.JSONDecodeError as err:
            rows.append((number, DataError(f"{p}:{number}: not valid JSON ({err.msg}, column {err.colno})")))
            continue
        if not isinstance(value, dict):
            value = DataError(f"{p}:{number}: a row must be a JSON object, got {type(value).__name__}")
        rows.append((number, value))
    return rows


def read_json_rows(path: Union[str, Path]) -> List[Row]:
    """The rows of a JSON-lines file, or of a ``.json`` file holding one array of objects (or one object of
    equal-length column lists), numbers kept as written. Blank lines are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"dataset {str(p)!r} could not be read: {err}") from err
    head = text.lstrip()[:1]
    if p.suffix.lower() == ".json" and head in ("[", "{"):
        try:
            whole = _DECODER.decode(text)
        except json.JSONDecodeError as err:
            if head == "[":
                raise DataError(f"{p}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
            whole = None  # several objects: JSON lines
        if isinstance(whole, list):
            return [(None, r if isinstance(r, dict) else DataError(
                f"{p}: array item {i} must be a JSON object, got {type(r).__name__}")) for i, r in enumerate(whole)]
        if isinstance(whole, dict) and whole and all(isinstance(v, list) for v in whole.values()) \
                and len({len(v) for v in whole.values()}) == 1:
            names = list(whole)
            return [(None, dict(zip(names, values))) for values in zip(*whole.values())]
    return _json_lines(p, text)


def load_rows(path: Union[str, Path]) -> Tuple[List[Row], List[str]]:
    """The rows and column names of a parquet / jsonl / json / csv file or an HF ``save_to_disk`` directory."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset {str(p)!r} does not exist")
    fmt = None if p.is_dir() else _FORMATS.get(p.suffix.lower())
    if not p.is_dir() and fmt is None:
        raise DataError(f"dataset {str(p)!r}: unsupported file type {p.suffix!r}; use one of {sorted(_FORMATS)}")
    if fmt == "json":
        rows = read_json_rows(p)
        columns: Dict[str, None] = {}
        for _, row in rows:
            if isinstance(row, dict):
                columns.update(dict.fromkeys(row))
        return rows, list(columns)
    ds = _load_with_datasets(p, fmt)
    return [(None, row) for row in ds], list(ds.column_names)


def _load_with_datasets(p: Path, fmt: Optional[str]):
    import datasets

    if fmt is None:
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as err:  # datasets raises several types for "not a saved dataset"
            raise DataError(f"dataset directory {str(p)!r} is not a `datasets` save_to_disk directory: {err}") from err
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"dataset directory {str(p)!r} has splits {list(ds)}, none named 'train'")
            ds = ds["train"]
        return ds
    kwargs: Dict[str, Any] = {}
    if fmt == "csv":  # every column as text (pandas would turn 5 into 5.0 next to an empty cell); only "" is missing
        with open(p, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
        kwargs = dict(features=datasets.Features({name: datasets.Value("string") for name in header}),
                      keep_default_na=False, na_values=[""])
    try:
        return datasets.load_dataset(fmt, data_files=str(p), split="train", **kwargs)
    except Exception as err:
        raise DataError(f"dataset {str(p)!r} could not be read as {fmt}: {err}") from err


def _log_skipped(what: str, skipped: Dict[int, str]) -> None:
    """List skipped rows once (the first ``_LISTED`` by name, the rest counted), on rank 0 under torchrun
    (every rank loads the same data before the process group exists)."""
    if not skipped or int(os.environ.get("RANK", "0")) != 0:
        return
    named = list(skipped.values())[:_LISTED]
    more = f"\n  ... and {len(skipped) - len(named)} more" if len(skipped) > len(named) else ""
    log.warning("%s: skipped %d row(s), left out of the dataset:\n  %s%s", what, len(skipped), "\n  ".join(named),
                more)


def load_prompts(
    path: Union[str, Path],
    prompt_key: str = "prompt",
    answer_key: Optional[str] = "answer",
    *,
    skip_bad_rows: bool = False,
) -> PromptDataset:
    """Load and validate a prompt dataset.

    Args:
        path: file or ``save_to_disk`` directory.
        prompt_key: column (dotted for nested) holding a string or a list of chat messages.
        answer_key: column holding the reference answer; None for datasets without answers.
        skip_bad_rows: list bad rows in the log and leave them out instead of raising on the first one.

    Raises:
        DataError: missing file/column, or (without ``skip_bad_rows``) a bad row, naming it.
    """
    rows, column_names = load_rows(path)
    columns = set(column_names)
    for name, what in ((prompt_key, "prompt"), (answer_key, "answer")):
        if name is not None and name.split(".")[0] not in columns:
            raise DataError(f"dataset {str(path)!r} has no {what} column {name!r}; columns: {sorted(columns)}")
    records: List[PromptRecord] = []
    skipped: Dict[int, str] = {}
    for index, (line, row) in enumerate(rows):
        try:
            if isinstance(row, DataError):
                raise row
            record = parse_row(row, index, prompt_key, answer_key)
            record.line = line
            records.append(record)
        except DataError as err:
            where = f"dataset {str(path)!r}" + (f" line {line}" if line is not None else "")
            message = str(err) if isinstance(row, DataError) else f"{where}: {err}"
            if not skip_bad_rows:
                raise DataError(message) from None
            skipped[index] = message
    _log_skipped(f"dataset {path}", skipped)
    if not records:
        raise DataError(f"dataset {str(path)!r} has no usable rows")
    return PromptDataset(str(path), records, skipped)


def check_prompt_lengths(dataset: PromptDataset, length_of: Callable[[Messages], int], max_len: int, *,
                         skip_bad_rows: bool = False) -> PromptDataset:
    """Measure every row's prompt in tokens as the rollout sends it (``length_of(messages)``) against ``max_len``.

    Called when a run starts, before the model is built. Over-long rows are an error naming the file,
    row and prompt; with ``skip_bad_rows`` they are listed once and left out of the returned dataset
    (so they never enter the sampling pool), next to the rows skipped at load.

    Raises:
        DataError: a prompt longer than ``max_len`` (without ``skip_bad_rows``), or no row left.
    """
    kept: List[PromptRecord] = []
    skipped: Dict[int, str] = {}
    for rec in dataset.records:
        n = length_of(rec.messages)
        if n <= max_len:
            kept.append(rec)
            continue
        message = (f"dataset {dataset.path!r} {rec.where()} (prompt {rec.key[:60]!r}): prompt is {n} tokens, "
                   f"longer than data.max_prompt_len={max_len}")
        if not skip_bad_rows:
            raise DataError(message + "; set data.skip_bad_rows=true to skip such rows")
        skipped[rec.index] = message
    if not skipped:
        return dataset
    _log_skipped(f"dataset {dataset.path}", skipped)
    if not kept:
        raise DataError(f"dataset {dataset.path!r} has no usable rows: every prompt is longer than "
                        f"data.max_prompt_len={max_len}")
    return PromptDataset(dataset.path, kept, {**dataset.skipped, **skipped})


def parse_row(row: Dict[str, Any], index: int, prompt_key: str, answer_key: Optional[str]) -> PromptRecord:
    """Validate one row into a :class:`PromptRecord`; errors name the row index and column."""
    prompt = _get(row, prompt_key)
    messages = to_messages(prompt, f"row {index} column {prompt_key!r}")
    answer = ""
    if answer_key is not None:
        value = _get(row, answer_key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"row {index}: column {answer_key!r} is empty")
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DataError(f"row {index}: column {answer_key!r} must be a string or number, got {type(value).__name__}")
        answer = str(value)
    return PromptRecord(index=index, messages=messages, answer=answer, key=prompt_key_of(messages))


def to_messages(prompt: Any, where: str = "prompt") -> Messages:
    """A string or a list of ``{"role", "content"}`` dicts as chat messages; errors name ``where``."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where} is empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and prompt:
        messages = []
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where} message {i} must have string 'role' and 'content'")
            messages.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "user" for m in messages):
            raise DataError(f"{where} has no user message")
        return messages
    raise DataError(f"{where} must be a non-empty string or list of chat messages, got {prompt!r:.80}")


def prompt_key_of(messages: Messages) -> str:
    """The stable prompt key: the stripped content of the first user message."""
    for m in messages:
        if m["role"] == "user":
            return m["content"].strip()
    raise DataError("prompt has no user message")


def tokenize_prompt(tokenizer, messages: Messages, *, max_len: int, where: str = "prompt") -> List[int]:
    """Render ``messages`` with the tokenizer's chat template (generation prompt on) into token ids.

    Raises:
        DataError: the rendered prompt is longer than ``max_len`` tokens (names ``where`` and both lengths).
    """
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = list(ids["input_ids"])
    if len(ids) > max_len:
        raise DataError(f"{where}: prompt is {len(ids)} tokens, longer than data.max_prompt_len={max_len}")
    return ids


def _get(row: Dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value

