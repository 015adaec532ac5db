"""Pure renderers: an InferenceService in, its Kubernetes children out.

Children: the serving config (ConfigMap), the desired adapter set (ConfigMap, kept apart so
adapters can change without touching the pod template), the report ConfigMap replicas
write their adapter state into, a ServiceAccount that may patch that one ConfigMap, the
Deployment, the Service and, with `autoscaling`, a HorizontalPodAutoscaler.

Adapters and the pod template: the Deployment mounts every claim the spec's adapters can
live on (for `fromJob`, the referenced job's output claim, known before the job finishes),
so an adapter that becomes available later, or a new adapter on an already mounted claim,
reaches running replicas through the adapter-set ConfigMap alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lmforge.operator import pods
from lmforge.operator.ownership import MANAGED_BY, child_labels, child_metadata, selector_labels
from lmforge.operator.settings import OperatorSettings
from lmforge.operator.storage import CACHE_MOUNT, Mounts, plan_mounts, pvc_path

from lmforge.api.kinds import InferenceService
from lmforge.api.servingconfig import (
    AdapterSet,
    DesiredAdapter,
    ServingConfig,
    StateReport,
    resolve_serving_config,
)

COMPONENT = "lmforge-inferencer"
CONTAINER = "server"
CONFIG_DIR = "/etc/lmforge"
ADAPTERS_DIR = "/etc/lmforge/adapters"
STATE_DIR = "/var/run/lmforge"
# The Pods metric (per replica, from the cluster's custom metrics API) the HPA scales on for
# each `autoscaling.metric`; a metrics adapter (e.g. prometheus-adapter) serves it from the
# series in the comment (README: "Autoscaling").
LOAD_METRICS = {
    # vllm:num_requests_running + vllm:num_requests_waiting
    "concurrency": "lmforge_serving_load",
    # vllm:num_requests_waiting
    "queue-length": "lmforge_serving_queue_length",
    # rate(lmforge_serving_requests_total[1m]), summed over adapters
    "requests-per-second": "lmforge_serving_requests_per_second",
    # the GPU exporter's utilization in percent (dcgm-exporter: DCGM_FI_DEV_GPU_UTIL)
    "gpu-utilization": "lmforge_serving_gpu_utilization",
    # 100 * vllm:kv_cache_usage_perc
    "kv-cache-usage": "lmforge_serving_kv_cache_usage",
}
# A cold model load can take many minutes (weights from a PVC or the hub onto the GPU).
STARTUP_SECONDS = 1800


@dataclass(frozen=True)
class ServingTarget:
    """Everything one reconcile renders from."""

    service: InferenceService
    namespace: str
    uid: str
    # Resolved URIs by model reference field (model, adapters[i], serving.speculative...);
    # '' for a fromJob reference whose job has no output yet.
    model_uris: dict[str, str]
    # Claims the adapters may live on (mounted whether or not the adapter is ready yet).
    adapter_claims: tuple[str, ...] = ()
    settings: OperatorSettings = field(default_factory=OperatorSettings)

    @property
    def name(self) -> str:
        return self.service.name


# ---------------------------------------------------------------- names


def deployment_name(target: ServingTarget) -> str:
    return target.name


def service_name(target: ServingTarget) -> str:
    return target.name


def config_map_name(target: ServingTarget) -> str:
    return f"{target.name}-serving-config"


def adapters_config_map_name(target: ServingTarget) -> str:
    return f"{target.name}-adapters"


def report_config_map_name(target: ServingTarget) -> str:
    return f"{target.name}-adapter-state"


def account_name(target: ServingTarget) -> str:
    return f"{target.name}-inferencer"


def url(target: ServingTarget) -> str:
    """Base URL of the OpenAI API inside the cluster."""
    return (
        f"http://{service_name(target)}.{target.namespace}.svc.cluster.local:"
        f"{target.settings.serving_port}/v1"
    )


def _metadata(target: ServingTarget, name: str) -> dict[str, Any]:
    return child_metadata(target.service, target.uid, target.namespace, name, COMPONENT)


# ---------------------------------------------------------------- locations


def static_model_uris(target: ServingTarget) -> dict[str, str]:
    """The model references that shape the pod (all but adapters)."""
    return {f: u for f, u in target.model_uris.items() if not f.startswith("adapters[")}


def plan_serving_mounts(target: ServingTarget) -> Mounts:
    """Base and draft model paths; adapters are not planned here (they come and go)."""
    return plan_mounts(static_model_uris(target))


def desired_adapters(target: ServingTarget) -> AdapterSet:
    """The adapters whose location is known, as paths in the pod. pvc:// adapters are read
    through the claim mounts, hub/S3 ones are not supported yet (they need a fetch at
    runtime) and stay out of the set; `adapter_problems` says so in status."""
    desired = []
    for i, adapter in enumerate(target.service.spec.adapters):
        uri = target.model_uris.get(f"adapters[{i}]", "")
        if uri.startswith("pvc://"):
            desired.append(DesiredAdapter(name=adapter.name, path=pvc_path(uri)[1], uri=uri))
    return AdapterSet(adapters=desired)


def adapter_problems(target: ServingTarget) -> dict[str, str]:
    """Adapters that cannot be served as written, by name, with the reason."""
    problems = {}
    for i, adapter in enumerate(target.service.spec.adapters):
        uri = target.model_uris.get(f"adapters[{i}]", "")
        if uri and not uri.startswith("pvc://"):
            problems[adapter.name] = (
                f"{uri}: adapters are read from PVCs (pvc://claim/path or fromJob); "
                "copy it onto a claim"
            )
    return problems


# ---------------------------------------------------------------- children


def render_serving_config(target: ServingTarget, mounts: Mounts) -> ServingConfig:
    paths = mounts.model_paths
    return resolve_serving_config(
        target.service,
        model=paths["model"],
        draft_model=paths.get("serving.speculative.draftModel"),
        adapters_file=f"{ADAPTERS_DIR}/adapters.json",
        state_file=f"{STATE_DIR}/state.json",
        port=target.settings.serving_port,
        report=StateReport(namespace=target.namespace, config_map=report_config_map_name(target)),
    )


def render_config_maps(target: ServingTarget, config: ServingConfig) -> list[dict[str, Any]]:
    """The serving config and the desired adapter set (the report ConfigMap is created
    separately: its data belongs to the replicas)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(target, config_map_name(target)),
            "data": {"serving.json": json.dumps(config.to_wire(), indent=2, sort_keys=True)},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(target, adapters_config_map_name(target)),
            "data": {"adapters.json": desired_adapters(target).dumps()},
        },
    ]


def render_report_config_map(target: ServingTarget) -> dict[str, Any]:
    """Where replicas report (one key per pod). Server-side applied without data: the
    replicas' keys belong to them (their field manager), so applying it again keeps them."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(target, report_config_map_name(target)),
    }


def render_access(target: ServingTarget) -> list[dict[str, Any]]:
    """A ServiceAccount that may read and patch the report ConfigMap, and nothing else."""
    return pods.report_writer_access(
        account_name(target),
        target.namespace,
        report_config_map_name(target),
        lambda name: _metadata(target, name),
    )


def _probe(path: str, port: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def render_pod_template(target: ServingTarget, mounts: Mounts) -> dict[str, Any]:
    spec, settings = target.service.spec, target.settings
    image = spec.image or settings.inferencer_image
    gpus = spec.gpus_per_replica
    port = settings.serving_port
    input_volumes, input_mounts = pods.input_volumes(mounts)
    mounted = {v["persistentVolumeClaim"]["claimName"] for v in input_volumes}
    for i, claim in enumerate(c for c in target.adapter_claims if c not in mounted):
        input_volumes.append(
            {
                "name": f"adapters-{i}",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
        )
        input_mounts.append(
            {"name": f"adapters-{i}", "mountPath": pvc_path(f"pvc://{claim}")[1], "readOnly": True}
        )
    volume_mounts: list[dict[str, Any]] = [
        {"name": "serving-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True},
        {"name": "state", "mountPath": STATE_DIR},
        {"name": "shm", "mountPath": "/dev/shm"},
        pods.CACHE_VOLUME_MOUNT,
        *input_mounts,
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "serving-config", "configMap": {"name": config_map_name(target)}},
        {"name": "adapters", "configMap": {"name": adapters_config_map_name(target)}},
        {"name": "state", "emptyDir": {}},
        {
            "name": "shm",
            "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory},
        },
        # Hub/S3 models are fetched into an emptyDir per replica (no shared cache claim).
        pods.cache_volume(mounts, None),
        *input_volumes,
    ]
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/hf"},
        # The image's user has no writable home: vLLM's compile and config caches go here.
        {"name": "XDG_CACHE_HOME", "value": f"{CACHE_MOUNT}/xdg"},
        {"name": "VLLM_CACHE_ROOT", "value": f"{CACHE_MOUNT}/vllm"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *pods.hub_token_env(spec.model.secret_ref),
    ]
    server = {
        "name": CONTAINER,
        "image": image,
        "command": ["lmforge", "serve", "--config", f"{CONFIG_DIR}/serving.json"],
        "env": env,
        "ports": [{"name": "http", "containerPort": port}],
        "resources": pods.container_resources(spec.resources, gpus),
        "volumeMounts": volume_mounts,
        "securityContext": pods.RESTRICTED_CONTAINER,
        # /ready: the base model answers and every loadable desired adapter is loaded.
        "readinessProbe": _probe("/ready", port, 5, 3),
        # /health: the engine process answers at all.
        "livenessProbe": _probe("/health", port, 10, 6),
        "startupProbe": _probe("/health", port, 10, STARTUP_SECONDS // 10),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": account_name(target),
        "securityContext": pods.pod_security_context(settings),
        "containers": [server],
        "volumes": volumes,
        # Streams in flight finish before the pod goes away.
        "terminationGracePeriodSeconds": 120,
        **pods.scheduling_fields(spec.scheduling, gpus),
    }
    init = pods.fetch_init_containers(mounts, image, env, volume_mounts)
    if init:
        pod_spec["initContainers"] = init
    return {
        "metadata": {
            "labels": child_labels(target.service, COMPONENT),
            "annotations": {"kubectl.kubernetes.io/default-container": CONTAINER},
        },
        "spec": pod_spec,
    }


def render_deployment(target: ServingTarget, mounts: Mounts) -> dict[str, Any]:
    spec = target.service.spec
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(target.service)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0}},
        "template": render_pod_template(target, mounts),
    }
    if spec.autoscaling is None:  # with an HPA, the HPA owns .spec.replicas
        deployment_spec["replicas"] = 1 if spec.replicas is None else spec.replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(target, deployment_name(target)),
        "spec": deployment_spec,
    }


# The field manager that holds a Deployment's spec.replicas between the operator letting go
# of them and the HPA's first write (see replicas_handover).
REPLICAS_HANDOVER = f"{MANAGED_BY}-replicas-handover"


def replicas_handover(target: ServingTarget, live: dict[str, Any] | None) -> dict[str, Any] | None:
    """What to apply, as REPLICAS_HANDOVER, before a Deployment the operator gave fixed
    replicas is applied without them (autoscaling switched on): its current replica count.

    Server-side apply deletes a field its last owner stops applying, and a Deployment
    without replicas defaults to 1: switching from `replicas: 3` to autoscaling would drop
    two serving replicas before the HPA's first look at the load. Kubernetes' documented
    way out is handing the field to another manager first, which keeps it until the HPA
    writes it. None when there is nothing to hand over; also at 0 replicas, which would
    keep the HPA off (it leaves a target at zero alone): the default 1 is its floor."""
    if target.service.spec.autoscaling is None or live is None:
        return None
    replicas = (live.get("spec") or {}).get("replicas")
    ours = any(
        entry.get("manager") == MANAGED_BY
        and entry.get("operation") == "Apply"
        and "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})
        for entry in live["metadata"].get("managedFields") or []
    )
    if not ours or not replicas:
        return None
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deployment_name(target), "namespace": target.namespace},
        "spec": {"replicas": replicas},
    }


def render_service(target: ServingTarget) -> dict[str, Any]:
    port = target.settings.serving_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(target, service_name(target)),
        "spec": {
            "selector": selector_labels(target.service),
            "ports": [{"name": "http", "port": port, "targetPort": "http"}],
        },
    }


def render_autoscaler(target: ServingTarget) -> dict[str, Any] | None:
    """An autoscaling/v2 HPA keeping `autoscaling.metric` per replica near `target` (a Pods
    metric served by the cluster's custom metrics API, see LOAD_METRICS). minReplicas 0
    needs KEDA (an HPA cannot scale to zero), so the HPA's floor is 1."""
    scaling = target.service.spec.autoscaling
    if scaling is None:
        return None
    metric = {
        "type": "Pods",
        "pods": {
            "metric": {"name": LOAD_METRICS[scaling.metric]},
            "target": {"type": "AverageValue", "averageValue": str(scaling.target)},
        },
    }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(target, deployment_name(target)),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": deployment_name(target),
            },
            "minReplicas": max(1, scaling.min_replicas),
            "maxReplicas": scaling.max_replicas,
            "metrics": [metric],
        },
    }


@dataclass(frozen=True)
class Children:
    """Everything an InferenceService owns, in the order it is applied."""

    config: ServingConfig
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]


def render_children(target: ServingTarget) -> Children:
    mounts = plan_serving_mounts(target)
    config = render_serving_config(target, mounts)
    objects = [
        *render_config_maps(target, config),
        render_report_config_map(target),
        *render_access(target),
        render_deployment(target, mounts),
        render_service(target),
    ]
    autoscaler = render_autoscaler(target)
    if autoscaler is not None:
        objects.append(autoscaler)
    return Children(config, objects)
