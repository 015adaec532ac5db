"""Pieces of a pod spec that Jobs (training) and Deployments (serving) share.

Each concern is a small pure function: security context, resources, scheduling,
input volumes, credentials, fetching init containers. Renderers compose them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmforge.operator.settings import OperatorSettings
from lmforge.operator.storage import CACHE_MOUNT, PVC_MOUNT, Mounts

from lmforge.api.common import ResourcesSpec, SchedulingSpec, SecretKeyReference

GPU_RESOURCE = "nvidia.com/gpu"

RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod_security_context(settings: OperatorSettings) -> dict[str, Any]:
    """Pods run as a fixed non-root user (Pod Security Standards: restricted)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "fsGroup": settings.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_resources(resources: ResourcesSpec, gpus: int) -> dict[str, Any]:
    """requests/limits of the main container; GPUs are requested and limited alike."""
    requests = dict(resources.requests)
    limits = dict(resources.limits)
    if gpus:
        requests[GPU_RESOURCE] = gpus
        limits[GPU_RESOURCE] = gpus
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def scheduling_fields(scheduling: SchedulingSpec, gpus: int) -> dict[str, Any]:
    """Pod spec fields for placement; GPU pods tolerate the GPU taint."""
    tolerations = [t.to_wire() for t in scheduling.tolerations]
    if gpus:
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    fields: dict[str, Any] = {"tolerations": tolerations}
    if scheduling.node_selector:
        fields["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.affinity:
        fields["affinity"] = scheduling.affinity
    if scheduling.priority_class_name:
        fields["priorityClassName"] = scheduling.priority_class_name
    return fields


def input_volumes(mounts: Mounts) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts) for the PVCs inputs are read from."""
    volumes, volume_mounts = [], []
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
    return volumes, volume_mounts


def cache_volume(mounts: Mounts, claim: str | None) -> dict[str, Any]:
    """The cache fetched inputs land in: a PVC when something is fetched and a claim is
    given (it survives restarts), else an emptyDir."""
    if mounts.needs_cache and claim is not None:
        return {"name": "cache", "persistentVolumeClaim": {"claimName": claim}}
    return {"name": "cache", "emptyDir": {}}


CACHE_VOLUME_MOUNT = {"name": "cache", "mountPath": CACHE_MOUNT}


def hub_token_env(secret: SecretKeyReference | None) -> list[dict[str, Any]]:
    """HF_TOKEN from the user's Secret (hub downloads), when one is named."""
    if secret is None:
        return []
    return [
        {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}},
        }
    ]


def fetch_init_containers(
    mounts: Mounts, image: str, env: list[dict[str, Any]], volume_mounts: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One init container per hub/S3 input, downloading it atomically into the cache."""
    return [
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


def report_writer_access(
    account: str, namespace: str, report: str, metadata: Callable[[str], dict[str, Any]]
) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding for pods that may get and patch one report
    ConfigMap (by resourceNames) and nothing else: code in a training or serving pod
    (trustRemoteCode models included) cannot touch other pods or objects.
    `metadata(name)` is the owner's child metadata."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(account),
            "automountServiceAccountToken": True,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(account),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": [report],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(account),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    ]
