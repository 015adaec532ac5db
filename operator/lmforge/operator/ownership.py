"""Who owns a child object: owner references, identifying labels and metadata.

Every child of an LMForge object carries the owner's kind and name as labels (the
operator finds children by them) and a controller owner reference (Kubernetes
garbage-collects them with the owner). Pure functions.
"""

from __future__ import annotations

from typing import Any

from lmforge.api.base import API_VERSION
from lmforge.api.kinds import KubernetesObject

MANAGED_BY = "lmforge-operator"
LABEL_KIND = "lmforge.io/job-kind"  # historical name: also set on InferenceService children
LABEL_NAME = "lmforge.io/job-name"
LABEL_ATTEMPT = "lmforge.io/attempt"  # a training job's attempt (restarts create new ones)
RESERVED_LABEL_PREFIXES = ("lmforge.io/job-", "app.kubernetes.io/", "kueue.x-k8s.io/")


def owner_reference(owner: KubernetesObject, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": owner.kind,
        "name": owner.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def selector_labels(owner: KubernetesObject) -> dict[str, str]:
    """The labels that identify an owner's children (and select its pods)."""
    return {LABEL_KIND: owner.kind, LABEL_NAME: owner.name}


def child_labels(owner: KubernetesObject, component: str) -> dict[str, str]:
    """Labels of every child: the owner's own labels plus the ones that identify it."""
    user = {
        k: v
        for k, v in (owner.metadata.get("labels") or {}).items()
        if not k.startswith(RESERVED_LABEL_PREFIXES)
    }
    return (
        user
        | {"app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/name": component}
        | selector_labels(owner)
    )


def child_metadata(
    owner: KubernetesObject,
    uid: str,
    namespace: str,
    name: str,
    component: str,
    **extra_labels: str,
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": child_labels(owner, component) | extra_labels,
        "ownerReferences": [owner_reference(owner, uid)],
    }
