"""Console output: a bar for people, JSON lines for collectors, chosen by terminal or flag."""

from __future__ import annotations

import io
import json
import logging

import pytest
from lmforge.trainer import console

from lmforge.api.kinds import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_shows_step_loss_throughput_and_eta() -> None:
    line = console.progress_line(
        Progress(step=30, total_steps=120, loss=0.61237, tokens_per_second=1234.5, eta_seconds=75),
        width=8,
    )
    assert line == "[##------]  30/120  loss 0.6124  1,234 tok/s  ETA 01:15"
    assert "ETA --:--" in console.progress_line(Progress(step=0, total_steps=None))


def test_format_follows_the_flag_then_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv(console.LOG_FORMAT_ENV, raising=False)
    assert console.log_format(_Tty()) == "human"
    assert console.log_format(io.StringIO()) == "json"  # a pipe or a file
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert console.log_format(_Tty()) == "json"  # a pod's terminal is read by collectors
    monkeypatch.setenv(console.LOG_FORMAT_ENV, "human")
    assert console.log_format(io.StringIO()) == "human"


def test_json_progress_lines_carry_the_report(caplog: pytest.LogCaptureFixture) -> None:
    out = console.Console("json")
    with caplog.at_level(logging.INFO, logger="lmforge.trainer.progress"):
        out.show(Progress(step=3, total_steps=9, loss=1.5))
    (record,) = caplog.records
    entry = json.loads(console.JsonFormatter().format(record))
    assert entry["message"] == "step 3/9"
    assert entry["progress"] == {"step": 3, "totalSteps": 9, "loss": 1.5}


def test_the_bar_is_redrawn_in_place_and_ends_its_line() -> None:
    stream = _Tty()
    bar = console.Console("human", stream)
    bar.show(Progress(step=1, total_steps=2))
    bar.show(Progress(step=2, total_steps=2))
    bar.end_line()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("ETA --:--\n")
