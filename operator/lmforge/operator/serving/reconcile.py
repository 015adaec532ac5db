"""Reconciling one InferenceService: observe, decide (pure), act. Idempotent.

Children are server-side applied under fixed names; children no longer rendered (the HPA
after autoscaling is switched off) are deleted; reports of replicas that are gone are
dropped from the report ConfigMap.
"""

from __future__ import annotations

import logging
from typing import Any

from lmforge.operator import timestamps
from lmforge.operator.kube import Kube
from lmforge.operator.metrics import OperatorMetrics
from lmforge.operator.ownership import LABEL_KIND, LABEL_NAME
from lmforge.operator.serving import render
from lmforge.operator.serving.lifecycle import AdapterRef, ServingObserved, decide_status
from lmforge.operator.serving.render import ServingTarget, render_children
from lmforge.operator.settings import OperatorSettings
from lmforge.operator.storage import LocalPathOnCluster
from lmforge.operator.training import lifecycle
from pydantic import ValidationError

from lmforge.api.kinds import KINDS, InferenceService, TrainingJob
from lmforge.api.references import model_references

log = logging.getLogger(__name__)

KIND = "InferenceService"
# Kinds of children that may be deleted when no longer rendered.
OPTIONAL_CHILDREN = ("HorizontalPodAutoscaler",)


def output_claim_of(job_body: dict[str, Any]) -> str | None:
    """The claim a training job writes its output to (known before it finishes)."""
    try:
        job = KINDS[job_body["kind"]].model_validate(
            {k: v for k, v in job_body.items() if k != "status"}
        )
    except (ValidationError, KeyError):
        return None
    assert isinstance(job, TrainingJob)
    return job.spec.output.existing_claim or f"{job.name}-output"


class ServingReconciler:
    """Converges InferenceServices; safe to call from any number of event handlers."""

    def __init__(self, kube: Kube, settings: OperatorSettings, metrics: OperatorMetrics) -> None:
        self.kube, self.settings, self.metrics = kube, settings, metrics

    def reconcile(self, kind: str, namespace: str, name: str) -> None:
        """One call per service at a time: the dispatcher serializes them."""
        with self.metrics.reconciling(kind):
            self._reconcile(namespace, name)

    def note_disruption(self, kind: str, namespace: str, name: str, pod: dict[str, Any]) -> None:
        """Deployments replace disrupted pods themselves; nothing to record."""

    def _reconcile(self, namespace: str, name: str) -> None:
        body = self.kube.get(KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.metrics.forget(KIND, namespace, name)
            return
        meta = body["metadata"]
        generation = int(meta.get("generation", 1))
        status: dict[str, Any] = body.get("status") or {}
        try:
            service = InferenceService.model_validate(
                {k: v for k, v in body.items() if k != "status"}
            )
        except ValidationError as err:
            self._fail(body, status, generation, "InvalidSpec", str(err)[:2000])
            return

        uris, refs, claims, model_ref = self._resolve(service, namespace)
        target = ServingTarget(service, namespace, meta["uid"], uris, tuple(claims), self.settings)
        selector = f"{LABEL_KIND}={KIND},{LABEL_NAME}={name}"
        deployment = None
        if all(uris.get(f, "") for f in render.static_model_uris(target)):
            try:
                children = render_children(target)
            except LocalPathOnCluster as err:
                self._fail(body, status, generation, "InvalidSpec", str(err))
                return
            if service.spec.autoscaling is not None:
                # Fixed replicas the spec no longer sets go to the HPA, not back to 1.
                # (A list: the operator's role may list Deployments, not get them.)
                current = next(
                    (
                        d
                        for d in self.kube.list_objects("Deployment", namespace, selector)
                        if d["metadata"]["name"] == render.deployment_name(target)
                    ),
                    None,
                )
                handover = render.replicas_handover(target, current)
                if handover is not None:
                    self.kube.apply(handover, field_manager=render.REPLICAS_HANDOVER)
            for obj in children.objects:
                applied = self.kube.apply(obj)
                if obj["kind"] == "Deployment":
                    deployment = applied
            self._delete_unrendered(namespace, selector, children.objects)

        pods = self.kube.list_objects("Pod", namespace, selector) if deployment else []
        live = {p["metadata"]["name"] for p in pods}
        report_cm = self.kube.get("ConfigMap", namespace, render.report_config_map_name(target))
        reports = dict((report_cm or {}).get("data") or {})
        stale = [pod for pod in reports if pod not in live]
        if stale and report_cm is not None:
            self.kube.merge_patch(
                "ConfigMap",
                namespace,
                report_cm["metadata"]["name"],
                {"data": dict.fromkeys(stale)},
            )
        spec = service.spec
        desired = spec.replicas if spec.replicas is not None else 1
        if spec.autoscaling is not None:
            desired = max(1, spec.autoscaling.min_replicas)
        observed = ServingObserved(
            generation=generation,
            status=status,
            url=render.url(target),
            model_uri=uris.get("model", ""),
            model_waiting_for=model_ref[0],
            model_job_failed=model_ref[1],
            adapters=refs,
            deployment=deployment,
            desired_replicas=desired,
            reports=reports,
            live_pods=live,
            now=timestamps.now(),
        )
        new = decide_status(observed)
        if new != status:
            self.kube.patch_status(KIND, namespace, name, new)
        self.metrics.record_phase(KIND, namespace, name, new.get("phase", "Pending"))
        self.metrics.record_adapters(
            namespace, name, {a["name"]: a["state"] for a in new.get("adapters", [])}
        )

    def _resolve(
        self, service: InferenceService, namespace: str
    ) -> tuple[dict[str, str], list[AdapterRef], list[str], tuple[str, bool]]:
        """URIs by reference field, the adapters as the status sees them, the claims adapters
        can live on, and (what spec.model waits for, whether that job failed)."""
        uris: dict[str, str] = {}
        jobs: dict[str, tuple[str, dict[str, Any] | None]] = {}
        for ref in model_references(service.spec):
            if ref.source.from_job is None:
                uris[ref.field] = ref.source.source or ""
                continue
            other = ref.source.from_job
            job = self.kube.get(other.kind, namespace, other.name)
            jobs[ref.field] = (f"{other.kind} {other.name}", job)
            uris[ref.field] = ((job or {}).get("status") or {}).get("output", {}).get("uri", "")

        def failed(field: str) -> bool:
            job = jobs.get(field, ("", None))[1]
            return bool(job and (job.get("status") or {}).get("phase") == "Failed")

        refs, claims = [], []
        problems = render.adapter_problems(
            ServingTarget(service, namespace, "", uris, (), self.settings)
        )
        for i, adapter in enumerate(service.spec.adapters):
            field = f"adapters[{i}]"
            uri = uris.get(field, "")
            waiting, job = jobs.get(field, ("", None))
            claim = None
            if uri.startswith("pvc://"):
                claim = uri.removeprefix("pvc://").partition("/")[0]
            elif job is not None:
                claim = output_claim_of(job)
            if claim and claim not in claims:
                claims.append(claim)
            refs.append(
                AdapterRef(
                    adapter.name, uri, waiting, failed(field), problems.get(adapter.name, "")
                )
            )
        model_waiting, _ = jobs.get("model", ("", None))
        return uris, refs, sorted(claims), (model_waiting, failed("model"))

    def _delete_unrendered(
        self, namespace: str, selector: str, objects: list[dict[str, Any]]
    ) -> None:
        rendered = {(o["kind"], o["metadata"]["name"]) for o in objects}
        for kind in OPTIONAL_CHILDREN:
            for child in self.kube.list_objects(kind, namespace, selector):
                if (kind, child["metadata"]["name"]) not in rendered:
                    self.kube.delete(kind, namespace, child["metadata"]["name"])

    def _fail(
        self,
        body: dict[str, Any],
        status: dict[str, Any],
        generation: int,
        reason: str,
        message: str,
    ) -> None:
        meta = body["metadata"]
        new = dict(status) | {"phase": "Failed", "observedGeneration": generation}
        new["conditions"] = lifecycle.set_condition(
            status.get("conditions") or [],
            "Ready",
            False,
            reason,
            message,
            generation,
            timestamps.now(),
        )
        if new != status:
            self.kube.patch_status(KIND, namespace_of(meta), meta["name"], new)
            self.kube.event(body, "Warning", reason, message)
        self.metrics.record_phase(KIND, namespace_of(meta), meta["name"], "Failed")


def namespace_of(meta: dict[str, Any]) -> str:
    return str(meta["namespace"])
