"""User errors on the command line: one line ``error: ...`` on stderr, exit code 2; bugs keep their traceback."""

from __future__ import annotations

import pytest

from megatron_spo.checkpoint_dir import IncompleteCheckpointError, NoCheckpointError
from megatron_spo.cli import main
from megatron_spo.commands.errors import report_user_errors, user_error_types
from megatron_spo.config import ConfigError
from megatron_spo.data import DataError
from megatron_spo.trainer.layout import LayoutError


def _raise(err: BaseException):
    def command() -> int:
        raise err
    return command


@pytest.mark.parametrize("err", [
    ConfigError("train.steps must be > 0, got 0"), DataError("dataset 'x.jsonl': row 3: no prompt"),
    LayoutError("parallel.tensor=3 does not divide the model's num_attention_heads=4 (m/config.json)"),
    NoCheckpointError("no complete checkpoint under runs/x"), IncompleteCheckpointError("checkpoint c is corrupt"),
    FileNotFoundError("no HF config.json at m"),
])
def test_user_errors_are_one_line_and_exit_2(err, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert report_user_errors(_raise(err)) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {err}\n" and captured.out == ""


def test_a_message_over_several_lines_is_printed_on_one(capsys):
    assert report_user_errors(_raise(ConfigError("first\nsecond"))) == 2
    assert capsys.readouterr().err == "error: first second\n"


def test_only_rank_0_prints(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert report_user_errors(_raise(DataError("bad row"))) == 2
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("err", [RuntimeError("a bug"), KeyError("x"), ValueError("internal"), TypeError("t")])
def test_bugs_keep_their_traceback(err):
    with pytest.raises(type(err)):
        report_user_errors(_raise(err))


def test_unsupported_architecture_once_its_module_is_loaded():
    from megatron_spo.megatron.model import UnsupportedArchitectureError

    assert UnsupportedArchitectureError in user_error_types()


def test_cli_main_reports_user_errors_of_any_sub_command(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: config file '{tmp_path / 'missing.yaml'}' does not exist\n"
    # a missing model directory: the converter's FileNotFoundError, before torch.distributed starts
    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "no_model"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: no HF config.json at {tmp_path / 'no_model'}\n"
