"""Pure renderers: a training job's spec in, its Kubernetes children out.

No cluster I/O here. The handlers read the world, call these functions, and
apply what comes back (server-side apply, so applying twice changes nothing).
One generic path serves every training kind (FinetuneJob, AlignmentJob); the
pod pieces shared with serving live in `pods`, `storage` and `ownership`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lmforge.operator import pods
from lmforge.operator.ownership import LABEL_ATTEMPT, child_metadata, selector_labels
from lmforge.operator.ownership import child_labels as _child_labels
from lmforge.operator.settings import OperatorSettings
from lmforge.operator.storage import CACHE_MOUNT, Mounts, render_claim
from lmforge.operator.storage import plan_mounts as plan_input_mounts

from lmforge.api.kinds import TrainingJob, TrainingJobSpec
from lmforge.api.runconfig import (
    EXIT_BAD_CONFIG,
    EXIT_BAD_DATA,
    REPORT_CONFIGMAP_ENV,
    REWARD_FUNCTIONS_DIR,
    RunConfig,
    input_locations,
    resolve_run_config,
    reward_functions,
)

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
COMPONENT = "lmforge-trainer"

CONFIG_DIR = "/etc/lmforge"
OUTPUT_MOUNT = "/mnt/output"
TRAINER_CONTAINER = "trainer"


@dataclass(frozen=True)
class TrainingTarget:
    """Everything one reconcile renders from: the job, where it lives, which attempt."""

    job: TrainingJob
    namespace: str
    uid: str
    # Resolved URI of every model reference (`references.model_references`): a `source`,
    # or the referenced job's status.output.uri for `fromJob`.
    model_uris: dict[str, str]
    attempt: int = 0
    settings: OperatorSettings = field(default_factory=OperatorSettings)

    @property
    def spec(self) -> TrainingJobSpec:
        return self.job.spec

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


def report_name(target: TrainingTarget) -> str:
    """The ConfigMap the job's pods write progress and checkpoints into."""
    return f"{target.name}-report"


def trainer_account_name(target: TrainingTarget) -> str:
    return f"{target.name}-trainer"


def output_path(target: TrainingTarget) -> str:
    """Folder of this job inside the output volume."""
    return target.spec.output.path.strip("/") or f"{target.kind.lower()}/{target.name}"


def output_uri(target: TrainingTarget) -> str:
    """Where the final artifact will be, as other jobs and services reference it."""
    return f"pvc://{output_claim_name(target)}/{output_path(target)}/final"


# ---------------------------------------------------------------- locations


def plan_mounts(target: TrainingTarget) -> Mounts:
    """Every input of the job (models, data) as a path in the pod; inputs on the job's
    own output claim are read through its read-write mount."""
    return plan_input_mounts(
        target.model_uris,
        input_locations(target.spec),
        own_claim=(output_claim_name(target), OUTPUT_MOUNT),
    )


# ---------------------------------------------------------------- children


def labels(target: TrainingTarget) -> dict[str, str]:
    """Labels of every child: the job's own labels plus the ones that identify it."""
    return _child_labels(target.job, COMPONENT)


def _metadata(target: TrainingTarget, name: str, **extra_labels: str) -> dict[str, Any]:
    return child_metadata(target.job, target.uid, target.namespace, name, COMPONENT, **extra_labels)


def render_run_config(target: TrainingTarget, mounts: Mounts) -> RunConfig:
    """The run config every pod of the job reads from /etc/lmforge/run.json."""
    return resolve_run_config(
        target.job,
        models=mounts.model_paths,
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
            render_claim(
                _metadata(target, output_claim_name(target)),
                size,
                access,
                create.storage_class_name if create else None,
            )
        )
    if mounts.needs_cache:
        access = ["ReadWriteMany"] if multi_node else ["ReadWriteOnce"]
        claims.append(
            render_claim(
                _metadata(target, cache_claim_name(target)),
                target.settings.cache_size,
                access,
                None,
            )
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
            "selector": selector_labels(target.job),
            "ports": [
                {"name": "rendezvous", "port": target.settings.master_port},
                {"name": "metrics", "port": target.settings.metrics_port},
            ],
        },
    }


def render_report(target: TrainingTarget) -> dict[str, Any]:
    """The report ConfigMap, without data: the trainer owns its keys (server-side apply
    leaves fields of other managers alone), the operator only creates and labels it."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(target, report_name(target)),
    }


def render_trainer_access(target: TrainingTarget) -> list[dict[str, Any]]:
    """A ServiceAccount that may read and patch the job's report ConfigMap, nothing else:
    no rights over pods, so code in a training job cannot touch other workloads."""
    return pods.report_writer_access(
        trainer_account_name(target),
        target.namespace,
        report_name(target),
        lambda name: _metadata(target, name),
    )


def _env(target: TrainingTarget) -> list[dict[str, Any]]:
    """The torchrun environment of a node, identity, caches and the hub token."""
    spec, settings = target.spec, target.settings
    processes = spec.distributed.processes_per_node or max(spec.distributed.gpus_per_node, 1)
    return [
        {"name": "MASTER_ADDR", "value": f"{workload_name(target)}-0.{service_name(target)}"},
        {"name": "MASTER_PORT", "value": str(settings.master_port)},
        {"name": "NNODES", "value": str(spec.distributed.nodes)},
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "NPROC_PER_NODE", "value": str(processes)},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "LMFORGE_ATTEMPT", "value": str(target.attempt)},
        {"name": REPORT_CONFIGMAP_ENV, "value": report_name(target)},
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *pods.hub_token_env(spec.model.secret_ref),
    ]


def render_pod_template(target: TrainingTarget, mounts: Mounts) -> dict[str, Any]:
    spec, settings = target.spec, target.settings
    image = spec.image or settings.trainer_image
    gpus = spec.distributed.gpus_per_node
    input_volumes, input_mounts = pods.input_volumes(mounts)
    for i, name in enumerate(
        sorted({f.config_map for f in reward_functions(spec) if f.config_map})
    ):
        input_volumes.append({"name": f"function-{i}", "configMap": {"name": name}})
        input_mounts.append(
            {
                "name": f"function-{i}",
                "mountPath": f"{REWARD_FUNCTIONS_DIR}/{name}",
                "readOnly": True,
            }
        )
    volume_mounts: list[dict[str, Any]] = [
        {"name": "run-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "output", "mountPath": OUTPUT_MOUNT},
        {"name": "shm", "mountPath": "/dev/shm"},
        pods.CACHE_VOLUME_MOUNT,
        *input_mounts,
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "run-config", "configMap": {"name": config_map_name(target)}},
        {"name": "output", "persistentVolumeClaim": {"claimName": output_claim_name(target)}},
        {
            "name": "shm",
            "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory},
        },
        pods.cache_volume(mounts, cache_claim_name(target)),
        *input_volumes,
    ]
    env = _env(target)
    trainer = {
        "name": TRAINER_CONTAINER,
        "image": image,
        "command": ["python", "-m", "lmforge.trainer", "run", "--config", f"{CONFIG_DIR}/run.json"],
        "env": env,
        "ports": [
            {"name": "rendezvous", "containerPort": settings.master_port},
            {"name": "metrics", "containerPort": settings.metrics_port},
        ],
        "resources": pods.container_resources(spec.resources, gpus),
        "volumeMounts": volume_mounts,
        "securityContext": pods.RESTRICTED_CONTAINER,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(target),
        "serviceAccountName": trainer_account_name(target),
        "securityContext": pods.pod_security_context(settings),
        "containers": [trainer],
        "volumes": volumes,
        **pods.scheduling_fields(spec.scheduling, gpus),
    }
    init = pods.fetch_init_containers(mounts, image, env, volume_mounts)
    if init:
        pod_spec["initContainers"] = init
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
        render_report(target),
        *render_claims(target, mounts),
        render_service(target),
        *render_trainer_access(target),
        render_training_job(target, mounts, workload_suspended=workload_suspended),
    ]
    return Children(config, objects)
