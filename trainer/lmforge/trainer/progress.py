"""The progress channel from the trainer to people and to the operator.

Rank 0 publishes one `Progress` report (the same model as the job's
`status.progress`) to every sink that applies:

- `progress.json` in the output folder (atomic write): what `lmforge run`
  shows and what survives the pod;
- the job's report ConfigMap (named by LMFORGE_REPORT_CONFIGMAP in a pod): the
  one object the job's pods may patch; the operator watches it and copies the
  report into the job's status;
- Prometheus gauges on `metrics_port` (step, loss, learning rate, tokens/s,
  ETA, GPU memory);
- at the end, the container's termination message (`/dev/termination-log`):
  the final metrics and output, read by the operator from the pod status.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from lmforge.api.kinds import Progress
from lmforge.api.runconfig import REPORT_CHECKPOINT, REPORT_CONFIGMAP_ENV, REPORT_PROGRESS

log = logging.getLogger(__name__)

TERMINATION_LOG = Path("/dev/termination-log")
TERMINATION_LIMIT = 4096  # bytes the kubelet keeps of a termination message


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PrometheusSink:
    """Gauges scraped from the trainer pod (labels: job name and namespace)."""

    def __init__(self, port: int, job: str, namespace: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["job_name", "namespace"]
        self.values = {"job_name": job, "namespace": namespace or "local"}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        self.gauges = {
            "step": gauge("lmforge_train_step", "Optimizer steps done"),
            "total_steps": gauge("lmforge_train_total_steps", "Optimizer steps planned"),
            "epoch": gauge("lmforge_train_epoch", "Epochs done (fractional)"),
            "loss": gauge("lmforge_train_loss", "Latest training loss"),
            "eval_loss": gauge("lmforge_train_eval_loss", "Latest evaluation loss"),
            "learning_rate": gauge("lmforge_train_learning_rate", "Current learning rate"),
            "tokens_per_second": gauge(
                "lmforge_train_tokens_per_second", "Training throughput over all processes"
            ),
            "eta_seconds": gauge("lmforge_train_eta_seconds", "Estimated seconds to completion"),
        }
        self.gpu_memory = gauge("lmforge_gpu_memory_bytes", "Peak GPU memory allocated by rank 0")
        self.server, _ = start_http_server(port, registry=self.registry)
        self.port = self.server.server_address[1]

    def publish(self, progress: Progress) -> None:
        for name, gauge in self.gauges.items():
            value = getattr(progress, name)
            if value is not None:
                gauge.labels(**self.values).set(value)
        peak = _gpu_peak_memory()
        if peak is not None:
            self.gpu_memory.labels(**self.values).set(peak)

    def close(self) -> None:
        self.server.shutdown()


def _gpu_peak_memory() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    return None


class ReportSink:
    """Writes the latest report into the job's report ConfigMap (rate limited).

    The pod's ServiceAccount may get/patch that one ConfigMap and nothing else, so
    code running in a training job (trust_remote_code models included) cannot touch
    other workloads.
    """

    def __init__(self, name: str, namespace: str, every_seconds: float = 15) -> None:
        from kubernetes import client, config

        config.load_incluster_config()
        self.api = client.CoreV1Api()
        self.name, self.namespace, self.every = name, namespace, every_seconds
        self.last = 0.0

    def publish(self, progress: Progress, force: bool = False) -> None:
        if not force and time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        self.write(REPORT_PROGRESS, progress.model_dump_json(by_alias=True, exclude_none=True))

    def write(self, key: str, value: str) -> None:
        try:
            self.api.patch_namespaced_config_map(self.name, self.namespace, {"data": {key: value}})
        except Exception as err:  # reporting must never kill training
            log.warning("could not write %s to ConfigMap %s: %s", key, self.name, err)


@dataclass
class ProgressReporter:
    """Computes progress (throughput, ETA) and fans it out to the sinks."""

    output_dir: Path
    job: str
    namespace: str = ""
    metrics_port: int | None = None
    started: float = field(default_factory=time.monotonic)
    tokens_seen: int = 0
    latest: Progress = field(default_factory=Progress)

    def __post_init__(self) -> None:
        self.prometheus = (
            PrometheusSink(self.metrics_port, self.job, self.namespace)
            if self.metrics_port is not None
            else None
        )
        report, pod_ns = os.environ.get(REPORT_CONFIGMAP_ENV), os.environ.get("POD_NAMESPACE")
        self.report: ReportSink | None = None
        if report and pod_ns and os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                self.report = ReportSink(report, pod_ns)
            except Exception as err:
                log.warning("progress reports to the operator disabled: %s", err)

    def update(
        self,
        *,
        step: int,
        total_steps: int | None,
        epoch: float | None = None,
        loss: float | None = None,
        eval_loss: float | None = None,
        learning_rate: float | None = None,
        tokens_seen: int | None = None,
        steps_this_session: int | None = None,
        force: bool = False,
    ) -> Progress:
        """Record the state after `step`; returns the report that was published."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        if tokens_seen is not None:
            self.tokens_seen = tokens_seen
        eta = None
        if total_steps and steps_this_session:
            eta = int(elapsed / steps_this_session * max(total_steps - step, 0))
        previous = self.latest
        self.latest = Progress(
            step=step,
            total_steps=total_steps,
            epoch=round(epoch, 4) if epoch is not None else None,
            # A resume from the last checkpoint may report one step past the plan.
            percent=min(100, int(100 * step / total_steps)) if total_steps else None,
            eta_seconds=eta,
            tokens_per_second=round(self.tokens_seen / elapsed, 2) if self.tokens_seen else None,
            loss=round(loss, 6) if loss is not None else previous.loss,
            eval_loss=round(eval_loss, 6) if eval_loss is not None else previous.eval_loss,
            learning_rate=learning_rate if learning_rate is not None else previous.learning_rate,
            updated_at=now(),
        )
        self._write_json(self.output_dir / "progress.json", self.latest.to_wire())
        if self.prometheus is not None:
            self.prometheus.publish(self.latest)
        if self.report is not None:
            self.report.publish(self.latest, force=force)
        return self.latest

    def checkpoint(self, step: int, path: Path) -> None:
        """A checkpoint became complete: tell the operator (status.lastCheckpoint)."""
        if self.report is not None:
            report = {"step": step, "path": str(path), "time": now()}
            self.report.write(REPORT_CHECKPOINT, json.dumps(report))

    def finish(self, summary: dict[str, Any]) -> None:
        """Publish the final report and leave the summary as the termination message."""
        if self.report is not None:
            self.report.publish(self.latest, force=True)
        message = json.dumps(summary, separators=(",", ":"))
        if len(message) > TERMINATION_LIMIT:  # keep what the operator needs most
            message = json.dumps({k: summary[k] for k in ("output", "step") if k in summary})
        if TERMINATION_LOG.exists():  # mounted by the kubelet; never created elsewhere
            with contextlib.suppress(OSError):
                TERMINATION_LOG.write_text(message)
        if self.prometheus is not None:
            self.prometheus.close()

    @staticmethod
    def _write_json(path: Path, data: dict[str, Any]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
