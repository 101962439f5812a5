"""Metrics logging: JSONL + tensorboard events, resumed runs, the PNG, and the SIGTERM stop flag."""

from __future__ import annotations

import os
import signal

import pytest

from megatron_spo.trainer.metrics_log import MetricsLogger, plot_metrics, read_metrics
from megatron_spo.trainer.preemption import PreemptionFlag


def test_jsonl_tensorboard_and_png(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=3, show_progress=False)
    for step in range(3):
        logger.log(step, {"reward/mean": 0.1 * step, "loss": 1.0 / (step + 1), "grad_norm": float("nan")})
    logger.close()
    # a resumed run re-logs step 2: the last record wins
    logger = MetricsLogger(tmp_path, total_steps=4, start_step=2, show_progress=False)
    logger.log(2, {"reward/mean": 0.5, "loss": 0.25})
    logger.log(2, {"eval/toy/avg@4": 0.75})
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[2]["reward/mean"] == 0.5 and records[0]["grad_norm"] == "nan"
    assert records[2]["eval/toy/avg@4"] == 0.75 and records[2]["grad_norm"] == "nan"  # merged, later wins
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "metrics.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="none of"):
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "x.png", keys=("absent",))


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "r1", total_steps=1, enabled=False)
    logger.log(0, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "r1").exists()


def test_sigterm_sets_the_flag_instead_of_killing():
    flag = PreemptionFlag()
    try:
        assert not flag.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.should_stop() and flag.signal_name == "SIGTERM"
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_stop_file_requests_a_stop(tmp_path):
    flag = PreemptionFlag(signals=(), stop_file=tmp_path / "STOP")
    assert not flag.should_stop()
    (tmp_path / "STOP").touch()
    assert flag.should_stop() and "stop file" in flag.signal_name
    flag.clear_stop_file()
    assert not (tmp_path / "STOP").exists()


def test_phase_clock_records_seconds_and_throughput():
    from megatron_spo.trainer.metrics_log import PhaseClock

    metrics = {}
    clock = PhaseClock(metrics)
    with clock("update", tokens=100.0):
        sum(range(10000))
    with clock("sync"):
        pass
    assert metrics["time/update_s"] > 0 and metrics["time/sync_s"] >= 0
    assert metrics["time/update_tokens_per_s"] == 100.0 / metrics["time/update_s"]
    assert "time/sync_tokens_per_s" not in metrics
