"""Reconciling one training job: read, decide (pure), write. Idempotent by construction.

Every step can be repeated or interrupted (an operator killed at any point) and
the next run converges: children are server-side applied under fixed names,
the attempt number lives in the job's status and is written *before* the new
attempt's Job is created, and Jobs of other attempts are deleted.

Reads come from the watch caches (`ClusterCache`), which also remember this
process's own writes until the watches catch up; children whose rendered form did
not change since this process applied them are not sent again.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import replace
from typing import Any

from kubernetes.client.exceptions import ApiException
from lmforge.operator import timestamps
from lmforge.operator.cache import ClusterCache, digest
from lmforge.operator.kube import Kube
from lmforge.operator.metrics import OperatorMetrics
from lmforge.operator.ownership import LABEL_ATTEMPT
from lmforge.operator.settings import OperatorSettings
from lmforge.operator.storage import LocalPathOnCluster
from lmforge.operator.training import lifecycle
from lmforge.operator.training.lifecycle import TERMINAL_PHASES, Action, Observed, decide
from lmforge.operator.training.render import (
    OUTPUT_MOUNT,
    TrainingTarget,
    output_claim_name,
    output_uri,
    plan_mounts,
    render_children,
    report_name,
    workload_name,
)
from pydantic import ValidationError

from lmforge.api.kinds import KINDS, TrainingJob, TrainingJobSpec
from lmforge.api.references import model_references

log = logging.getLogger(__name__)


class Reconciler:
    """Converges training jobs; safe to call from any number of event handlers."""

    def __init__(
        self,
        kube: Kube,
        settings: OperatorSettings,
        metrics: OperatorMetrics,
        cache: ClusterCache,
    ) -> None:
        self.kube, self.settings, self.metrics, self.cache = kube, settings, metrics, cache
        # A reconcile and a disruption record of one job both write its status.
        self._locks: defaultdict[tuple[str, str, str], threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    def _lock(self, key: tuple[str, str, str]) -> threading.Lock:
        with self._guard:
            return self._locks[key]

    def reconcile(self, kind: str, namespace: str, name: str) -> None:
        """Bring one job's children and status in line with its spec and its pods."""
        with self._lock((kind, namespace, name)), self.metrics.reconciling(kind):
            self._reconcile(kind, namespace, name)

    def _reconcile(self, kind: str, namespace: str, name: str) -> None:
        body = self.cache.job(kind, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.metrics.forget(kind, namespace, name)
            self.cache.forget((kind, namespace, name))
            return
        status: dict[str, Any] = body.get("status") or {}
        meta = body["metadata"]
        generation = int(meta.get("generation", 1))
        if (
            status.get("phase") in TERMINAL_PHASES
            and status.get("observedGeneration") == generation
        ):
            self.metrics.record_phase(kind, namespace, name, status["phase"])
            # terminal and up to date: nothing can change any more, but a Job of an earlier
            # attempt may be left if the operator died between a restart's create and delete
            self._delete_other_attempts(
                namespace,
                int(status.get("restarts", 0)),
                self.cache.workloads(kind, namespace, name),
            )
            return

        try:
            job = KINDS[kind].model_validate({k: v for k, v in body.items() if k != "status"})
        except ValidationError as err:  # the CRD should prevent this; say so rather than crash
            self._fail_invalid(body, status, generation, str(err)[:2000])
            return
        assert isinstance(job, TrainingJob)

        spec = job.spec
        attempt = int(status.get("restarts", 0))
        dependencies, model_uris = self._resolve_models(job, namespace)
        target = TrainingTarget(job, namespace, meta["uid"], model_uris, attempt, self.settings)
        claims: dict[str, bool] | None = None  # known once every model reference resolved
        if all(model_uris.values()):
            try:
                claims = plan_mounts(target).claims
            except LocalPathOnCluster as err:
                self._fail_invalid(body, status, generation, str(err))
                return
        workloads = self.cache.workloads(kind, namespace, name)
        current = next(
            (w for w in workloads if w["metadata"]["name"] == workload_name(target)), None
        )
        # Checked until the attempt's workload exists (its pods found the volumes then).
        missing_volumes = (
            self._missing_claims(target, claims) if current is None and claims is not None else []
        )
        pods = self.cache.pods(kind, namespace, name, attempt) if current else []
        report = self.cache.report(kind, namespace, name)
        observed = Observed(
            generation=generation,
            status=status,
            backoff_limit=spec.run_policy.backoff_limit,
            suspend=spec.run_policy.suspend,
            queued=spec.scheduling.queue_name is not None,
            dependencies=dependencies,
            workload=current,
            pods=pods,
            report=dict((report or {}).get("data") or {}) if current else {},
            missing_volumes=missing_volumes,
            output_uri=output_uri(target),
            output_claim=output_claim_name(target),
            output_mount=OUTPUT_MOUNT,
            output_kind=spec.output_kind,
            now=timestamps.now(),
        )
        decision = decide(observed)

        if decision.action is Action.RESTART:
            # Status first: once restarts is bumped, any later run creates the new attempt.
            self._patch_status(kind, namespace, name, decision.status)
            target = replace(target, attempt=attempt + 1)
            self._apply(target, workload_suspended=None, present=set())
            self._delete_other_attempts(namespace, target.attempt, workloads)
            restarting = lifecycle.find_condition(decision.status["conditions"], "Restarting")
            self.metrics.restarts.labels(kind, (restarting or {}).get("reason", "Unknown")).inc()
        else:
            if decision.action is Action.APPLY:
                # children the watches show; one that vanished is applied again at once
                present = {("Job", current["metadata"]["name"])} if current else set()
                if report is not None:
                    present.add(("ConfigMap", report_name(target)))
                self._apply(
                    target,
                    workload_suspended=None,
                    observed_workload=current,
                    present=present,
                    inputs=render_inputs(body, model_uris, attempt),
                )
                if current is None:
                    # The Job exists now, as the apply returned it: the one status write
                    # says what it waits for (not "creating", then a second write).
                    created = next(
                        (
                            w
                            for w in self.cache.workloads(kind, namespace, name)
                            if w["metadata"]["name"] == workload_name(target)
                        ),
                        None,
                    )
                    if created is not None:
                        decision = decide(replace(observed, workload=created))
            # whatever the decision: an operator killed between a restart's create and delete
            # leaves the earlier attempt's Job, and the new attempt may have finished since
            self._delete_other_attempts(namespace, attempt, workloads)
            if decision.status != status:
                self._patch_status(kind, namespace, name, decision.status)
        for type_, reason, message in decision.events:
            self.kube.event(body, type_, reason, message)
        phase = decision.status.get("phase", "Pending")
        self.metrics.record_phase(kind, namespace, name, phase)
        if phase in TERMINAL_PHASES and status.get("phase") not in TERMINAL_PHASES:
            self.metrics.observe_finished(kind, phase, meta.get("creationTimestamp"))
        if phase == "Running":
            self.metrics.count_gpu_time(kind, namespace, name, gpus_requested(spec))

    def _resolve_models(
        self, job: TrainingJob, namespace: str
    ) -> tuple[dict[str, dict[str, Any] | None], dict[str, str]]:
        """Every model reference's URI; fromJob ones from the referenced job's output ('' while
        it has none). Returns the referenced jobs too, by a description naming the field."""
        dependencies: dict[str, dict[str, Any] | None] = {}
        uris: dict[str, str] = {}
        for ref in model_references(job.spec):
            if ref.source.from_job is None:
                uris[ref.field] = ref.source.source or ""
                continue
            other = ref.source.from_job
            body = self.cache.job(other.kind, namespace, other.name)
            dependencies[f"{other.kind} {other.name} (spec.{ref.field})"] = body
            uris[ref.field] = ((body or {}).get("status") or {}).get("output", {}).get("uri", "")
        return dependencies, uris

    def _missing_claims(self, target: TrainingTarget, inputs: dict[str, bool]) -> list[str]:
        """Claims the pods would mount that do not exist (inputs, an existing output claim):
        said at once instead of pods pending forever. The job's own claims are created."""
        wanted = sorted(inputs)
        if target.spec.output.existing_claim:
            wanted.append(target.spec.output.existing_claim)
        return [
            f'PersistentVolumeClaim "{claim}" not found'
            for claim in wanted
            if self.kube.get("PersistentVolumeClaim", target.namespace, claim) is None
        ]

    def _fail_invalid(
        self, body: dict[str, Any], status: dict[str, Any], generation: int, message: str
    ) -> None:
        """A spec the cluster cannot run: Failed at once, with the reason in the condition."""
        meta = body["metadata"]
        new = dict(status) | {"phase": "Failed", "observedGeneration": generation}
        conditions = status.get("conditions") or []
        for type_, value in (
            ("Failed", True),
            ("Stalled", True),
            ("Ready", False),
            ("Reconciling", False),
        ):
            conditions = lifecycle.set_condition(
                conditions, type_, value, "InvalidSpec", message, generation, timestamps.now()
            )
        new["conditions"] = conditions
        self._patch_status(body["kind"], meta["namespace"], meta["name"], new)
        if status.get("phase") != "Failed":
            self.kube.event(body, "Warning", "InvalidSpec", message)

    def note_disruption(self, kind: str, namespace: str, name: str, pod: dict[str, Any]) -> None:
        """Record a disrupted pod (evicted, preempted, node lost) on the job.

        The Job's podFailurePolicy replaces such a pod without failing the attempt,
        so nothing else would tell the user; the pod may be gone a moment later.
        """
        cond = next(
            (
                c
                for c in pod.get("status", {}).get("conditions") or []
                if c.get("type") == "DisruptionTarget" and c.get("status") == "True"
            ),
            None,
        )
        if cond is None:
            return
        pod_name = pod["metadata"]["name"]
        message = (
            f"pod {pod_name}: {cond.get('reason', 'Disrupted')}: {cond.get('message', '')}".rstrip(
                ": "
            )
            + "; replaced without counting against runPolicy.backoffLimit"
        )
        with self._lock((kind, namespace, name)):
            body = self.cache.job(kind, namespace, name)
            if body is None:
                return
            status = dict(body.get("status") or {})
            previous = lifecycle.find_condition(status.get("conditions") or [], "Disrupted")
            if previous is not None and previous.get("message") == message:
                return  # already recorded
            status["conditions"] = lifecycle.set_condition(
                status.get("conditions") or [],
                "Disrupted",
                True,
                str(cond.get("reason") or "Disrupted"),
                message,
                int(body["metadata"].get("generation", 1)),
                timestamps.now(),
            )
            self._patch_status(kind, namespace, name, status)
            self.kube.event(body, "Warning", "Disrupted", message)
            self.metrics.restarts.labels(kind, "Disrupted").inc()

    def _patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.cache.wrote(self.kube.patch_status(kind, namespace, name, status))

    def _apply(
        self,
        target: TrainingTarget,
        *,
        workload_suspended: bool | None,
        present: set[tuple[str, str]],
        observed_workload: dict[str, Any] | None = None,
        inputs: str | None = None,
    ) -> None:
        """Apply the children whose rendered form changed since this process applied them
        (all of them after a restart; any the watches no longer show). With the render
        `inputs` of the last such pass and both watched children present, not even a render.

        When the Job exists, its `suspend` is Kueue's to decide: we carry the value we read
        back, locked to the version we read it from, so a stale read can never re-suspend a
        Job that Kueue admitted meanwhile (409: a newer version exists, and its watch event
        brings the next reconcile)."""
        if observed_workload is not None:
            workload_suspended = observed_workload["spec"].get("suspend")
        report = ("ConfigMap", report_name(target))
        job = (target.kind, target.namespace, target.name)
        if inputs is not None:
            inputs = digest({"inputs": inputs, "suspended": workload_suspended})
            watched_present = {("Job", workload_name(target)), report} <= present
            if watched_present and self.cache.children_current(job, inputs):
                return
        children = render_children(target, workload_suspended=workload_suspended).objects
        complete = True  # every child is now as rendered
        for obj in children:
            key = (obj["kind"], obj["metadata"]["name"])
            watched = obj["kind"] == "Job" or key == report
            if (not watched or key in present) and self.cache.unchanged(obj):
                continue
            sent = obj
            if obj["kind"] == "Job" and observed_workload is not None:
                version = observed_workload["metadata"].get("resourceVersion")
                sent = {**obj, "metadata": {**obj["metadata"], "resourceVersion": version}}
            try:
                applied = self.kube.apply(sent)
            except ApiException as err:
                if err.status != 409 or sent is obj:
                    raise
                log.info("Job %s changed since it was read; next event applies", key[1])
                complete = False
                continue
            self.cache.applied(obj)  # the rendered form, without the version lock
            if watched:
                self.cache.wrote(applied)
        if inputs is not None and complete:
            self.cache.rendered(job, inputs, children)

    def _delete_other_attempts(
        self, namespace: str, attempt: int, workloads: list[dict[str, Any]]
    ) -> None:
        for workload in workloads:
            labels = workload["metadata"].get("labels") or {}
            if labels.get(LABEL_ATTEMPT) != str(attempt):
                self.kube.delete("Job", namespace, workload["metadata"]["name"])
                self.cache.deleted("Job", namespace, workload["metadata"]["name"])


def gpus_requested(spec: TrainingJobSpec) -> int:
    return int(spec.distributed.nodes * spec.distributed.gpus_per_node)


def render_inputs(body: dict[str, Any], model_uris: dict[str, str], attempt: int) -> str:
    """A digest of everything a job's children are rendered from besides the operator's
    settings: the job without its status and resourceVersion (spec, labels, uid, ...), the
    resolved model URIs and the attempt."""
    meta = {k: v for k, v in body["metadata"].items() if k != "resourceVersion"}
    job = {k: v for k, v in body.items() if k not in ("status", "metadata")}
    return digest({"job": job, "metadata": meta, "models": model_uris, "attempt": attempt})
