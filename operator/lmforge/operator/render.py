"""Pure renderers: a training job's spec in, its Kubernetes children out.

No cluster I/O here. The handlers read the world, call these functions, and
apply what comes back (server-side apply, so applying twice changes nothing).
One generic path serves every training kind (FinetuneJob, AlignmentJob).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lmforge.api.base import API_VERSION
from lmforge.api.kinds import KubernetesObject, TrainingJobSpec
from lmforge.api.runconfig import EXIT_BAD_CONFIG, EXIT_BAD_DATA, RunConfig, resolve_run_config

MANAGED_BY = "lmforge-operator"
LABEL_KIND = "lmforge.io/job-kind"
LABEL_NAME = "lmforge.io/job-name"
LABEL_ATTEMPT = "lmforge.io/attempt"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
RESERVED_LABEL_PREFIXES = ("lmforge.io/job-", "app.kubernetes.io/", "kueue.x-k8s.io/")

CONFIG_DIR = "/etc/lmforge"
OUTPUT_MOUNT = "/mnt/output"
CACHE_MOUNT = "/mnt/cache"
PVC_MOUNT = "/mnt/pvc"
GPU_RESOURCE = "nvidia.com/gpu"
TRAINER_CONTAINER = "trainer"


@dataclass(frozen=True)
class OperatorSettings:
    """Cluster-wide settings of the operator (from its flags / Helm values)."""

    trainer_image: str = "ghcr.io/lmforge/trainer:0.1.0"
    master_port: int = 29500
    metrics_port: int = 9090
    cache_size: str = "100Gi"
    default_output_size: str = "50Gi"
    run_as_user: int = 1000


@dataclass(frozen=True)
class TrainingTarget:
    """Everything one reconcile renders from: the job, where it lives, which attempt."""

    job: KubernetesObject  # FinetuneJob or AlignmentJob
    namespace: str
    uid: str
    model_uri: str  # spec.model.source, or the referenced job's status.output.uri
    attempt: int = 0
    settings: OperatorSettings = field(default_factory=OperatorSettings)

    @property
    def spec(self) -> TrainingJobSpec:
        spec = self.job.spec  # type: ignore[attr-defined]
        assert isinstance(spec, TrainingJobSpec)
        return spec

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def kind(self) -> str:
        return self.job.kind


# ---------------------------------------------------------------- names


def workload_name(target: TrainingTarget, attempt: int | None = None) -> str:
    """The batch/v1 Job of one attempt; a restart is a new attempt (all ranks restart)."""
    return f"{target.name}-{target.attempt if attempt is None else attempt}"


def service_name(target: TrainingTarget) -> str:
    return target.name


def config_map_name(target: TrainingTarget) -> str:
    return f"{target.name}-run-config"


def output_claim_name(target: TrainingTarget) -> str:
    return target.spec.output.existing_claim or f"{target.name}-output"


def cache_claim_name(target: TrainingTarget) -> str:
    return f"{target.name}-cache"


def trainer_account_name(target: TrainingTarget) -> str:
    return f"{target.name}-trainer"


def output_path(target: TrainingTarget) -> str:
    """Folder of this job inside the output volume."""
    return target.spec.output.path.strip("/") or f"{target.kind.lower()}/{target.name}"


def output_uri(target: TrainingTarget) -> str:
    """Where the final artifact will be, as other jobs and services reference it."""
    return f"pvc://{output_claim_name(target)}/{output_path(target)}/final"


# ---------------------------------------------------------------- locations


class LocalPathOnCluster(ValueError):
    """A file:// or relative location, which only `lmforge run` can open."""

    def __init__(self, uri: str) -> None:
        super().__init__(
            f"{uri} is a local path, which only `lmforge run` can read; on a cluster use "
            "pvc://claim/path, hf://org/name or s3://bucket/key"
        )


@dataclass(frozen=True)
class Mounts:
    """Volumes a job's pods need to read their inputs, and what init containers fetch."""

    claims: dict[str, bool]  # claim name -> read only
    fetches: list[tuple[str, str]]  # (uri, destination folder) fetched before training
    model_path: str
    data_paths: dict[str, str]  # uri -> path the trainer opens

    @property
    def needs_cache(self) -> bool:
        return bool(self.fetches)


def _pvc_path(uri: str) -> tuple[str, str]:
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    return claim, f"{PVC_MOUNT}/{claim}/{path}".rstrip("/")


def plan_mounts(target: TrainingTarget) -> Mounts:
    """Map every input URI to a path inside the pod: PVCs mounted read-only, hub and S3
    content fetched by an init container into the cache volume, hf:// datasets streamed."""
    claims: dict[str, bool] = {}
    fetches: list[tuple[str, str]] = []

    def locate(uri: str, cache_dest: str) -> str:
        if uri.startswith("pvc://"):
            claim, path = _pvc_path(uri)
            if claim != output_claim_name(target):
                claims.setdefault(claim, True)
            else:  # our own output volume, mounted read-write already
                return path.replace(f"{PVC_MOUNT}/{claim}", OUTPUT_MOUNT, 1)
            return path
        if uri.startswith(("s3://", "hf://")):
            fetches.append((uri, cache_dest))
            return cache_dest
        raise LocalPathOnCluster(uri)

    model_path = locate(target.model_uri, f"{CACHE_MOUNT}/model")
    data_paths: dict[str, str] = {}
    spec = target.spec
    sources = [*spec.dataset.sources, *spec.dataset.eval_split.sources]
    for i, source in enumerate(sources):
        if source.uri.startswith("hf://"):
            data_paths[source.uri] = source.uri  # the datasets library reads the hub itself
        else:
            data_paths[source.uri] = locate(source.uri, f"{CACHE_MOUNT}/data/{i}")
    return Mounts(claims, fetches, model_path, data_paths)


# ---------------------------------------------------------------- children


def owner_reference(target: TrainingTarget) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": target.kind,
        "name": target.name,
        "uid": target.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(target: TrainingTarget) -> dict[str, str]:
    """Labels of every child: the job's own labels plus the ones that identify it."""
    user = {
        k: v
        for k, v in (target.job.metadata.get("labels") or {}).items()
        if not k.startswith(RESERVED_LABEL_PREFIXES)
    }
    return user | {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/name": "lmforge-trainer",
        LABEL_KIND: target.kind,
        LABEL_NAME: target.name,
    }


def _metadata(target: TrainingTarget, name: str, **extra_labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": target.namespace,
        "labels": labels(target) | extra_labels,
        "ownerReferences": [owner_reference(target)],
    }


def render_run_config(target: TrainingTarget, mounts: Mounts) -> RunConfig:
    """The run config every pod of the job reads from /etc/lmforge/run.json."""
    if target.kind != "FinetuneJob":
        raise NotImplementedError(f"{target.kind} run configs come with the alignment trainer")
    return resolve_run_config(
        target.job,  # type: ignore[arg-type]
        model=mounts.model_path,
        output=f"{OUTPUT_MOUNT}/{output_path(target)}",
        resolve_data_uri=lambda uri: mounts.data_paths.get(uri, uri),
        metrics_port=target.settings.metrics_port,
    ).model_copy(update={"namespace": target.namespace})


def render_config_map(target: TrainingTarget, config: RunConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(target, config_map_name(target)),
        "data": {"run.json": json.dumps(config.to_wire(), indent=2, sort_keys=True)},
    }


def _claim(
    target: TrainingTarget, name: str, size: Any, access: list[str], storage_class: str | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": access, "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(target, name),
        "spec": spec,
    }


def render_claims(target: TrainingTarget, mounts: Mounts) -> list[dict[str, Any]]:
    """PVCs the job creates: its output (unless an existing claim is used) and a cache."""
    spec = target.spec
    multi_node = spec.distributed.nodes > 1
    claims = []
    if spec.output.existing_claim is None:
        create = spec.output.create
        access: list[str] = (
            list(create.access_modes)
            if create
            else (["ReadWriteMany"] if multi_node else ["ReadWriteOnce"])
        )
        size = create.size if create else target.settings.default_output_size
        claims.append(
            _claim(
                target,
                output_claim_name(target),
                size,
                access,
                create.storage_class_name if create else None,
            )
        )
    if mounts.needs_cache:
        access = ["ReadWriteMany"] if multi_node else ["ReadWriteOnce"]
        claims.append(
            _claim(target, cache_claim_name(target), target.settings.cache_size, access, None)
        )
    return claims


def render_service(target: TrainingTarget) -> dict[str, Any]:
    """Headless Service: stable DNS names for the pods (MASTER_ADDR) before they are ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(target, service_name(target)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_KIND: target.kind, LABEL_NAME: target.name},
            "ports": [
                {"name": "rendezvous", "port": target.settings.master_port},
                {"name": "metrics", "port": target.settings.metrics_port},
            ],
        },
    }


def render_trainer_access(target: TrainingTarget) -> list[dict[str, Any]]:
    """A ServiceAccount that may annotate its own pods with progress (nothing more)."""
    name = trainer_account_name(target)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(target, name)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(target, name),
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(target, name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": target.namespace}],
        },
    ]


RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _env(target: TrainingTarget) -> list[dict[str, Any]]:
    spec, settings = target.spec, target.settings
    processes = spec.distributed.processes_per_node or max(spec.distributed.gpus_per_node, 1)
    env: list[dict[str, Any]] = [
        {"name": "MASTER_ADDR", "value": f"{workload_name(target)}-0.{service_name(target)}"},
        {"name": "MASTER_PORT", "value": str(settings.master_port)},
        {"name": "NNODES", "value": str(spec.distributed.nodes)},
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "NPROC_PER_NODE", "value": str(processes)},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "LMFORGE_ATTEMPT", "value": str(target.attempt)},
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    secret = spec.model.secret_ref
    if secret is not None:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}},
            }
        )
    return env


def _resources(target: TrainingTarget) -> dict[str, Any]:
    res = target.spec.resources
    requests = {k: v for k, v in res.requests.items()}
    limits = {k: v for k, v in res.limits.items()}
    gpus = target.spec.distributed.gpus_per_node
    if gpus:
        requests[GPU_RESOURCE] = gpus
        limits[GPU_RESOURCE] = gpus
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def render_pod_template(target: TrainingTarget, mounts: Mounts) -> dict[str, Any]:
    spec, settings = target.spec, target.settings
    image = spec.image or settings.trainer_image
    volume_mounts = [
        {"name": "run-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "output", "mountPath": OUTPUT_MOUNT},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "cache", "mountPath": CACHE_MOUNT},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "run-config", "configMap": {"name": config_map_name(target)}},
        {"name": "output", "persistentVolumeClaim": {"claimName": output_claim_name(target)}},
        {
            "name": "shm",
            "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory},
        },
        {"name": "cache", "persistentVolumeClaim": {"claimName": cache_claim_name(target)}}
        if mounts.needs_cache
        else {"name": "cache", "emptyDir": {}},
    ]
    for i, (claim, read_only) in enumerate(sorted(mounts.claims.items())):
        volumes.append(
            {
                "name": f"input-{i}",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only},
            }
        )
        volume_mounts.append(
            {"name": f"input-{i}", "mountPath": f"{PVC_MOUNT}/{claim}", "readOnly": read_only}
        )
    env = _env(target)
    init = [
        {
            "name": f"fetch-{i}",
            "image": image,
            "command": ["python", "-m", "lmforge.trainer", "fetch", "--uri", uri, "--dest", dest],
            "env": env,
            "volumeMounts": volume_mounts,
            "securityContext": RESTRICTED_CONTAINER,
        }
        for i, (uri, dest) in enumerate(mounts.fetches)
    ]
    ports = [
        {"name": "rendezvous", "containerPort": settings.master_port},
        {"name": "metrics", "containerPort": settings.metrics_port},
    ]
    trainer = {
        "name": TRAINER_CONTAINER,
        "image": image,
        "command": ["python", "-m", "lmforge.trainer", "run", "--config", f"{CONFIG_DIR}/run.json"],
        "env": env,
        "ports": ports,
        "resources": _resources(target),
        "volumeMounts": volume_mounts,
        "securityContext": RESTRICTED_CONTAINER,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    scheduling = spec.scheduling
    tolerations = [t.to_wire() for t in scheduling.tolerations]
    if spec.distributed.gpus_per_node:
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(target),
        "serviceAccountName": trainer_account_name(target),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": init,
        "containers": [trainer],
        "volumes": volumes,
        "tolerations": tolerations,
    }
    if scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.affinity:
        pod_spec["affinity"] = scheduling.affinity
    if scheduling.priority_class_name:
        pod_spec["priorityClassName"] = scheduling.priority_class_name
    if not init:
        del pod_spec["initContainers"]
    return {
        "metadata": {
            "labels": labels(target) | {LABEL_ATTEMPT: str(target.attempt)},
            "annotations": {"kubectl.kubernetes.io/default-container": TRAINER_CONTAINER},
        },
        "spec": pod_spec,
    }


def render_training_job(
    target: TrainingTarget, mounts: Mounts, *, workload_suspended: bool | None = None
) -> dict[str, Any]:
    """The Indexed batch/v1 Job of the current attempt: one pod per node.

    backoffLimit 0: any failed pod ends the attempt and the operator decides (from
    the failure's class) whether all ranks restart. The podFailurePolicy fails at
    once on bad data or configuration and ignores disruptions (the pod is replaced).
    `suspend` follows runPolicy.suspend; with a Kueue queue the Job is created
    suspended and Kueue admits it by unsuspending, so the value the existing Job
    has (`workload_suspended`) is kept.
    """
    spec = target.spec
    nodes = spec.distributed.nodes
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [EXIT_BAD_CONFIG, EXIT_BAD_DATA],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": render_pod_template(target, mounts),
    }
    queued = spec.scheduling.queue_name is not None
    if spec.run_policy.suspend:
        job_spec["suspend"] = True
    elif queued:  # created suspended; afterwards Kueue decides, so keep what it set
        job_spec["suspend"] = True if workload_suspended is None else workload_suspended
    else:
        job_spec["suspend"] = False
    if spec.run_policy.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    if spec.run_policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.run_policy.ttl_seconds_after_finished
    extra = {LABEL_ATTEMPT: str(target.attempt)}
    if queued:
        extra[KUEUE_QUEUE_LABEL] = spec.scheduling.queue_name  # type: ignore[assignment]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(target, workload_name(target), **extra),
        "spec": job_spec,
    }


@dataclass(frozen=True)
class Children:
    """Everything a training job owns, in the order it is applied."""

    config: RunConfig
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]


def render_children(target: TrainingTarget, *, workload_suspended: bool | None = None) -> Children:
    """All children of one attempt of a training job."""
    mounts = plan_mounts(target)
    config = render_run_config(target, mounts)
    objects = [
        render_config_map(target, config),
        *render_claims(target, mounts),
        render_service(target),
        *render_trainer_access(target),
        render_training_job(target, mounts, workload_suspended=workload_suspended),
    ]
    return Children(config, objects)
