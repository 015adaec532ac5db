"""The operator's own Prometheus metrics and its /metrics, /healthz, /readyz endpoints."""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, get_args

from lmforge.operator import timestamps
from lmforge.operator.training.lifecycle import Failure
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lmforge.api.kinds import KINDS, TRAINING_KINDS, JobPhase, ServicePhase

PHASES = get_args(JobPhase)
SERVICE_KIND = "InferenceService"
# The phases each kind's status can show (a zero series for each, per kind).
PHASES_BY_KIND = {kind: PHASES for kind in TRAINING_KINDS} | {SERVICE_KIND: get_args(ServicePhase)}
# Series created at start (value 0) so that rates, alerts and dashboard panels have data
# before the first reconcile error or restart, as Prometheus's naming guide recommends.
RESTART_REASONS = tuple(f.value for f in Failure if f.retryable)


class OperatorMetrics:
    """Jobs and services by phase, per-object phase, adapter states, leadership, reconciles,
    errors, durations, restarts and GPU-hours. Label names avoid `job` and `instance`,
    which Prometheus sets itself; `job_name` names the job or InferenceService."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Gauge(
            "lmforge_jobs",
            "Training jobs and InferenceServices by kind and phase",
            ["kind", "phase"],
            registry=r,
        )
        self.reconciles = Counter("lmforge_reconcile_total", "Reconciles run", ["kind"], registry=r)
        self.reconcile_errors = Counter(
            "lmforge_reconcile_errors_total", "Reconciles that raised", ["kind"], registry=r
        )
        self.reconcile_seconds = Histogram(
            "lmforge_reconcile_duration_seconds",
            "Time spent in one reconcile",
            ["kind"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "lmforge_job_duration_seconds",
            "Creation to completion of finished jobs",
            ["kind", "phase"],
            registry=r,
            buckets=(
                60,
                300,
                900,
                1800,
                3600,
                3 * 3600,
                6 * 3600,
                12 * 3600,
                24 * 3600,
                72 * 3600,
                float("inf"),
            ),
        )
        self.restarts = Counter(
            "lmforge_job_restarts_total",
            "Restarts after retryable failures",
            ["kind", "reason"],
            registry=r,
        )
        self.gpu_hours = Counter(
            "lmforge_gpu_hours_requested_total",
            "GPU-hours requested by running training jobs",
            ["kind"],
            registry=r,
        )
        self.api_requests = Counter(
            "lmforge_api_requests_total",
            "Requests the operator sent to the API server (watches excluded)",
            ["method"],
            registry=r,
        )
        self.job_phase = Gauge(
            "lmforge_job_phase",
            "1 for the current phase of each training job and InferenceService",
            ["kind", "namespace", "job_name", "phase"],
            registry=r,
        )
        self.adapter_state = Gauge(
            "lmforge_adapter_state",
            "1 for the current state of each adapter of each InferenceService",
            ["namespace", "job_name", "adapter", "state"],
            registry=r,
        )
        self.leader = Gauge(
            "lmforge_operator_leader",
            "1 while this replica holds the leader-election Lease and acts",
            registry=r,
        )
        for kind in KINDS:
            self.reconciles.labels(kind)
            self.reconcile_errors.labels(kind)
        for kind in TRAINING_KINDS:
            self.gpu_hours.labels(kind)
            for reason in RESTART_REASONS:
                self.restarts.labels(kind, reason)
        for kind, phases in PHASES_BY_KIND.items():  # zero series for every kind and phase
            for phase in phases:
                self.jobs.labels(kind, phase).set(0)
        self._phases: dict[tuple[str, str, str], str] = {}
        self._counts: Tally[tuple[str, str]] = Tally()  # jobs by (kind, phase)
        self._adapters: dict[tuple[str, str], dict[str, str]] = {}
        self._gpu_seen: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def reconciling(self, kind: str) -> Iterator[None]:
        """Count one reconcile, its duration and whether it raised."""
        started = time.monotonic()
        try:
            yield
        except Exception:
            self.reconcile_errors.labels(kind).inc()
            raise
        finally:
            self.reconciles.labels(kind).inc()
            self.reconcile_seconds.labels(kind).observe(time.monotonic() - started)

    def record_phase(self, kind: str, namespace: str, name: str, phase: str) -> None:
        with self._lock:
            previous = self._phases.get((kind, namespace, name))
            if previous == phase:
                return
            if previous is not None:
                self.job_phase.remove(kind, namespace, name, previous)
                self._count(kind, previous, -1)
            self._phases[(kind, namespace, name)] = phase
            self.job_phase.labels(kind, namespace, name, phase).set(1)
            self._count(kind, phase, +1)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            previous = self._phases.pop((kind, namespace, name), None)
            if previous is not None:
                self.job_phase.remove(kind, namespace, name, previous)
                self._count(kind, previous, -1)
            self._gpu_seen.pop((kind, namespace, name), None)
        if kind == SERVICE_KIND:
            self.record_adapters(namespace, name, {})

    def record_adapters(self, namespace: str, name: str, states: dict[str, str]) -> None:
        """An InferenceService's adapters now: adapter name -> state (Loaded, Failed, ...)."""
        with self._lock:
            previous = self._adapters.pop((namespace, name), {})
            for adapter, state in previous.items():
                if states.get(adapter) != state:
                    self.adapter_state.remove(namespace, name, adapter, state)
            for adapter, state in states.items():
                self.adapter_state.labels(namespace, name, adapter, state).set(1)
            if states:
                self._adapters[(namespace, name)] = dict(states)

    def _count(self, kind: str, phase: str, change: int) -> None:
        """Jobs by kind and phase, kept as phases change (not recounted per reconcile)."""
        self._counts[(kind, phase)] += change
        self.jobs.labels(kind, phase).set(self._counts[(kind, phase)])

    def observe_finished(self, kind: str, phase: str, created: str | None) -> None:
        started = timestamps.parse(created)
        if started is not None:
            self.job_seconds.labels(kind, phase).observe(
                max(time.time() - started.timestamp(), 0.0)
            )

    def count_gpu_time(self, kind: str, namespace: str, name: str, gpus: int) -> None:
        """Add the GPU time since this job was last seen running."""
        key, now = (kind, namespace, name), time.monotonic()
        with self._lock:
            last = self._gpu_seen.get(key)
            self._gpu_seen[key] = now
        if last is not None and gpus:
            self.gpu_hours.labels(kind).inc(gpus * (now - last) / 3600)


def serve(
    metrics: OperatorMetrics, port: int, live: Callable[[], bool], ready: Callable[[], bool]
) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz (liveness) and /readyz (readiness) in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = live()
                self._send(200 if ok else 503, b"ok\n" if ok else b"not live\n")
            elif self.path == "/readyz":
                ok = ready()
                self._send(200 if ok else 503, b"ok\n" if ok else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server
