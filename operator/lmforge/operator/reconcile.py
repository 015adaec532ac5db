"""Reconciling one training job: read, decide (pure), write. Idempotent by construction.

Every step can be repeated or interrupted (an operator killed at any point) and
the next run converges: children are server-side applied under fixed names,
the attempt number lives in the job's status and is written *before* the new
attempt's Job is created, and Jobs of other attempts are deleted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

from lmforge.operator import lifecycle
from lmforge.operator.kube import Kube
from lmforge.operator.lifecycle import TERMINAL_PHASES, Action, Observed, decide
from lmforge.operator.metrics import OperatorMetrics
from lmforge.operator.render import (
    LABEL_ATTEMPT,
    OperatorSettings,
    TrainingTarget,
    output_uri,
    render_children,
    workload_name,
)
from pydantic import ValidationError

from lmforge.api.kinds import KINDS

log = logging.getLogger(__name__)

TRAINING_KINDS = ("FinetuneJob", "AlignmentJob")


class Reconciler:
    """Converges training jobs; safe to call from any number of event handlers."""

    def __init__(self, kube: Kube, settings: OperatorSettings, metrics: OperatorMetrics) -> None:
        self.kube, self.settings, self.metrics = kube, settings, metrics
        self._locks: defaultdict[tuple[str, str, str], threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    def _lock(self, key: tuple[str, str, str]) -> threading.Lock:
        with self._guard:
            return self._locks[key]

    def reconcile(self, kind: str, namespace: str, name: str) -> None:
        """Bring one job's children and status in line with its spec and its pods."""
        started = time.monotonic()
        with self._lock((kind, namespace, name)):
            try:
                self._reconcile(kind, namespace, name)
            except Exception:
                self.metrics.reconcile_errors.labels(kind).inc()
                raise
            finally:
                self.metrics.reconciles.labels(kind).inc()
                self.metrics.reconcile_seconds.labels(kind).observe(time.monotonic() - started)

    def _reconcile(self, kind: str, namespace: str, name: str) -> None:
        body = self.kube.get(kind, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.metrics.forget(kind, namespace, name)
            return
        status: dict[str, Any] = body.get("status") or {}
        meta = body["metadata"]
        generation = int(meta.get("generation", 1))
        if (
            status.get("phase") in TERMINAL_PHASES
            and status.get("observedGeneration") == generation
        ):
            self.metrics.record_phase(kind, namespace, name, status["phase"])
            return  # terminal and up to date: nothing can change any more

        try:
            job = KINDS[kind].model_validate({k: v for k, v in body.items() if k != "status"})
        except ValidationError as err:  # the CRD should prevent this; say so rather than crash
            new = dict(status)
            new["phase"] = "Failed"
            new["conditions"] = lifecycle.set_condition(
                status.get("conditions") or [],
                "Failed",
                True,
                "InvalidSpec",
                str(err)[:2000],
                generation,
                lifecycle.now(),
            )
            self.kube.patch_status(kind, namespace, name, new)
            return

        spec = job.spec  # type: ignore[attr-defined]
        attempt = int(status.get("restarts", 0))
        dependency, dependency_name, model_uri = None, "", spec.model.source or ""
        if spec.model.from_job is not None:
            ref = spec.model.from_job
            dependency_name = f"{ref.kind} {ref.name}"
            dependency = self.kube.get(ref.kind, namespace, ref.name)
            model_uri = ((dependency or {}).get("status") or {}).get("output", {}).get("uri", "")

        target = TrainingTarget(job, namespace, meta["uid"], model_uri, attempt, self.settings)
        workloads = self.kube.jobs_of(kind, namespace, name)
        current = next(
            (w for w in workloads if w["metadata"]["name"] == workload_name(target)), None
        )
        pods = self.kube.pods_of(kind, namespace, name, attempt) if current else []
        observed = Observed(
            generation=generation,
            status=status,
            backoff_limit=spec.run_policy.backoff_limit,
            suspend=spec.run_policy.suspend,
            queued=spec.scheduling.queue_name is not None,
            dependency=dependency,
            dependency_name=dependency_name,
            workload=current,
            pods=pods,
            output_uri=output_uri(target),
            output_kind="full" if spec_method_type(spec) in ("full", "lisa") else "adapter",
            now=lifecycle.now(),
        )
        decision = decide(observed)

        if decision.action is Action.RESTART:
            # Status first: once restarts is bumped, any later run creates the new attempt.
            self.kube.patch_status(kind, namespace, name, decision.status)
            target = replace(target, attempt=attempt + 1)
            self._apply(target, workload_exists=False)
            self._delete_other_attempts(target, workloads)
            reason = next(
                (
                    c["reason"]
                    for c in decision.status.get("conditions", [])
                    if c["type"] == "Restarting"
                ),
                "Unknown",
            )
            self.metrics.restarts.labels(kind, reason).inc()
        else:
            if decision.action is Action.APPLY:
                self._apply(target, workload_exists=current is not None)
                self._delete_other_attempts(target, workloads)
            if decision.status != status:
                self.kube.patch_status(kind, namespace, name, decision.status)
        for type_, reason, message in decision.events:
            self.kube.event(body, type_, reason, message)
        phase = decision.status.get("phase", "Pending")
        self.metrics.record_phase(kind, namespace, name, phase)
        if phase in TERMINAL_PHASES and status.get("phase") not in TERMINAL_PHASES:
            self.metrics.observe_finished(kind, phase, meta.get("creationTimestamp"))
        if phase == "Running":
            self.metrics.count_gpu_time(kind, namespace, name, gpus_requested(spec))

    def _apply(self, target: TrainingTarget, *, workload_exists: bool) -> None:
        for obj in render_children(target, workload_exists=workload_exists).objects:
            self.kube.apply(obj)

    def _delete_other_attempts(
        self, target: TrainingTarget, workloads: list[dict[str, Any]]
    ) -> None:
        for workload in workloads:
            labels = workload["metadata"].get("labels") or {}
            if labels.get(LABEL_ATTEMPT) != str(target.attempt):
                self.kube.delete("Job", target.namespace, workload["metadata"]["name"])


def spec_method_type(spec: Any) -> str:
    """The trained-parameter method of a job: FinetuneJob.method or AlignmentJob.method.peft."""
    method = spec.method
    return str(getattr(method, "peft", method).type)


def gpus_requested(spec: Any) -> int:
    return int(spec.distributed.nodes * spec.distributed.gpus_per_node)
