"""Where a pod finds its inputs: PVCs mounted read-only, hub and S3 content fetched
into a cache volume by an init container. Pure functions, shared by every kind."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.api.references import reference_slug

CACHE_MOUNT = "/mnt/cache"
PVC_MOUNT = "/mnt/pvc"


class LocalPathOnCluster(ValueError):
    """A file:// or relative location, which only `lmforge run` can open."""

    def __init__(self, uri: str) -> None:
        super().__init__(
            f"{uri} is a local path, which only `lmforge run` can read; on a cluster use "
            "pvc://claim/path, hf://org/name or s3://bucket/key"
        )


@dataclass(frozen=True)
class Mounts:
    """Volumes a pod needs to read its inputs, and what init containers fetch."""

    claims: dict[str, bool]  # claim name -> read only
    fetches: list[tuple[str, str]]  # (uri, destination folder) fetched before the main container
    model_paths: dict[str, str]  # model reference field -> path in the pod
    data_paths: dict[str, str]  # data uri -> path the trainer opens

    @property
    def needs_cache(self) -> bool:
        return bool(self.fetches)

    @property
    def model_path(self) -> str:
        """The base model (spec.model)."""
        return self.model_paths["model"]


def pvc_path(uri: str) -> tuple[str, str]:
    """pvc://claim/path -> (claim, path inside the pod)."""
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    return claim, f"{PVC_MOUNT}/{claim}/{path}".rstrip("/")


def model_cache_path(field: str) -> str:
    """Where a fetched model lands: the base model at /mnt/cache/model, others by field."""
    return (
        f"{CACHE_MOUNT}/model"
        if field == "model"
        else f"{CACHE_MOUNT}/models/" + (reference_slug(field))
    )


def plan_mounts(
    models: dict[str, str],
    data_uris: Sequence[str] = (),
    own_claim: tuple[str, str] | None = None,
) -> Mounts:
    """Map every input URI to a path inside the pod.

    `models` maps model reference fields to resolved URIs; `own_claim` is (claim, mount
    path) of a volume the pod mounts read-write already (a job's output), which inputs
    on that claim are read from instead of mounting it twice. hf:// datasets are read by
    the datasets library itself.
    """
    claims: dict[str, bool] = {}
    fetches: list[tuple[str, str]] = []

    def locate(uri: str, cache_dest: str) -> str:
        if uri.startswith("pvc://"):
            claim, path = pvc_path(uri)
            if own_claim is not None and claim == own_claim[0]:
                return path.replace(f"{PVC_MOUNT}/{claim}", own_claim[1], 1)
            claims.setdefault(claim, True)
            return path
        if uri.startswith(("s3://", "hf://")):
            if (uri, cache_dest) not in fetches:
                fetches.append((uri, cache_dest))
            return cache_dest
        raise LocalPathOnCluster(uri)

    model_paths = {field: locate(uri, model_cache_path(field)) for field, uri in models.items()}
    data_paths: dict[str, str] = {}
    for i, uri in enumerate(data_uris):
        if uri.startswith("hf://"):
            data_paths[uri] = uri
        else:
            data_paths[uri] = locate(uri, f"{CACHE_MOUNT}/data/{i}")
    return Mounts(claims, fetches, model_paths, data_paths)


def render_claim(
    metadata: dict[str, Any], size: Any, access: list[str], storage_class: str | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": access, "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata,
        "spec": spec,
    }
