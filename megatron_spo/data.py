"""Prompt datasets: loading with `datasets`, row validation, stable prompt keys, tokenisation.

A row holds a prompt (a string, or a list of chat messages ``{"role", "content"}``) and a reference
answer. Column names are configurable; a dotted name reaches into nested columns (DAPO-style
``reward_model.ground_truth``). Every problem is reported with the file and row index; with
``skip_bad_rows`` bad rows are counted and logged instead of stopping the run.

The prompt key that SPO's value tracker and the offline-values file share is the stripped content
of the first user message (spec §1.2), so it does not depend on the chat template or system prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

log = logging.getLogger(__name__)

Messages = List[Dict[str, str]]

_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class DataError(ValueError):
    """A dataset file or row is unusable; the message names the file and the row index or column."""


@dataclass
class PromptRecord:
    """One validated dataset row.

    Attributes:
        index: row index in the source file.
        messages: the prompt as chat messages (a plain string becomes one user message).
        answer: the reference answer as a string.
        key: stable prompt key (stripped content of the first user message).
    """

    index: int
    messages: Messages
    answer: str
    key: str


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


def load_rows(path: Union[str, Path]):
    """Load a parquet / jsonl / json / csv file or an HF ``save_to_disk`` directory as a ``datasets.Dataset``."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset {str(p)!r} does not exist")
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as err:  # datasets raises several types for "not a saved dataset"
            raise DataError(f"dataset directory {str(p)!r} is not a `datasets` save_to_disk directory: {err}") from err
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"dataset directory {str(p)!r} has splits {list(ds)}, none named 'train'")
            ds = ds["train"]
        return ds
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"dataset {str(p)!r}: unsupported file type {p.suffix!r}; use one of {sorted(_FORMATS)}")
    try:
        return datasets.load_dataset(fmt, data_files=str(p), split="train")
    except Exception as err:
        raise DataError(f"dataset {str(p)!r} could not be read as {fmt}: {err}") from err


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
        skip_bad_rows: count and log bad rows instead of raising on the first one.

    Raises:
        DataError: missing file/column, or (without ``skip_bad_rows``) a bad row, naming it.
    """
    ds = load_rows(path)
    columns = set(ds.column_names)
    for name, what in ((prompt_key, "prompt"), (answer_key, "answer")):
        if name is not None and name.split(".")[0] not in columns:
            raise DataError(f"dataset {str(path)!r} has no {what} column {name!r}; columns: {sorted(columns)}")
    records: List[PromptRecord] = []
    skipped: Dict[int, str] = {}
    for index, row in enumerate(ds):
        try:
            records.append(parse_row(row, index, prompt_key, answer_key))
        except DataError as err:
            if not skip_bad_rows:
                raise DataError(f"dataset {str(path)!r}: {err}") from None
            skipped[index] = str(err)
    if skipped:
        log.warning("dataset %s: skipped %d bad rows (first: %s)", path, len(skipped), next(iter(skipped.values())))
    if not records:
        raise DataError(f"dataset {str(path)!r} has no usable rows")
    return PromptDataset(str(path), records, skipped)


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

