"""The progress channel: progress.json and the Prometheus endpoint."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from lmforge.trainer.progress import ProgressReporter

from lmforge.api.kinds import Progress


def test_reports_reach_file_and_prometheus(tmp_path: Path) -> None:
    reporter = ProgressReporter(tmp_path, "demo-job", "team-a", metrics_port=0)
    try:
        reporter.update(
            step=10,
            total_steps=40,
            epoch=0.5,
            loss=1.25,
            learning_rate=1e-4,
            tokens_seen=5000,
            steps_this_session=10,
        )
        report = Progress.model_validate(json.loads((tmp_path / "progress.json").read_text()))
        assert (report.step, report.total_steps, report.percent) == (10, 40, 25)
        assert report.loss == 1.25 and report.eta_seconds is not None
        assert report.tokens_per_second and report.tokens_per_second > 0

        assert reporter.prometheus is not None
        url = f"http://127.0.0.1:{reporter.prometheus.port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        labels = 'job_name="demo-job",namespace="team-a"'
        assert f"lmforge_train_step{{{labels}}} 10.0" in text
        assert f"lmforge_train_loss{{{labels}}} 1.25" in text
        assert f"lmforge_train_total_steps{{{labels}}} 40.0" in text
        assert "lmforge_train_eta_seconds" in text and "lmforge_train_tokens_per_second" in text

        # A report without a loss keeps the last known loss.
        reporter.update(step=11, total_steps=40, steps_this_session=11)
        assert reporter.latest.loss == 1.25
    finally:
        reporter.finish({"step": 11})


def test_checkpoints_are_announced_to_the_operator(tmp_path: Path) -> None:
    """In a pod, a completed checkpoint goes into the job's report ConfigMap (the operator
    copies it to status; tests/integration checks that path end to end)."""
    reporter = ProgressReporter(tmp_path, "demo-job")

    class Report:
        data: dict[str, str] = {}

        def write(self, key: str, value: str) -> None:
            self.data[key] = value

    sink = Report()
    reporter.report = sink  # type: ignore[assignment]
    reporter.checkpoint(40, tmp_path / "checkpoints" / "checkpoint-40")
    report = json.loads(sink.data["last-checkpoint"])
    assert report["step"] == 40 and report["path"].endswith("checkpoint-40") and report["time"]
