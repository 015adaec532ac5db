"""The operator's cluster I/O: server-side apply, reads, status patches, events.

Everything that talks to the API server lives here or in the handlers; the
decisions live in `render` and `lifecycle` (pure). Requests go through the
kubernetes client's authenticated transport as plain JSON (no model classes),
so objects stay the dicts the renderers produce.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from lmforge.operator import timestamps
from lmforge.operator.ownership import LABEL_ATTEMPT, LABEL_KIND, LABEL_NAME, MANAGED_BY

from lmforge.api.base import GROUP, VERSION
from lmforge.api.kinds import KINDS

log = logging.getLogger(__name__)

# API paths of the kinds the operator reads and writes.
_PATHS = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Service": ("/api/v1", "services"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "HorizontalPodAutoscaler": ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
}
_PATHS |= {kind: (f"/apis/{GROUP}/{VERSION}", cls.plural) for kind, cls in KINDS.items()}


def collection_path(kind: str, namespace: str | None) -> str:
    """The collection of a kind in one namespace, or in all of them (namespace None)."""
    prefix, resource = _PATHS[kind]
    if namespace is None:
        return f"{prefix}/{resource}"
    return f"{prefix}/namespaces/{namespace}/{resource}"


def api_version(kind: str) -> str:
    """apiVersion of a kind, e.g. batch/v1 ("v1" for the core group)."""
    prefix = _PATHS[kind][0]
    return prefix.removeprefix("/apis/").removeprefix("/api/")


def object_path(kind: str, namespace: str, name: str) -> str:
    return f"{collection_path(kind, namespace)}/{name}"


class Kube:
    """A small facade over the API server for what the operator needs."""

    def __init__(
        self,
        api: client.ApiClient | None = None,
        on_request: Callable[[str], None] | None = None,
    ) -> None:
        self.api = api or client.ApiClient()
        self.on_request = on_request  # called with the method of every request, e.g. metrics

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> dict[str, Any]:
        """One authenticated request; raises ApiException for error statuses."""
        if self.on_request is not None:
            self.on_request(method)
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        prepared = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*prepared[:4], _request_timeout=timeout)
        response.read()  # type: ignore[no-untyped-call]
        data = response.data or b""
        if response.status >= 400:
            raise ApiException(status=response.status, reason=response.reason, http_resp=response)
        return dict(json.loads(data)) if data else {}

    def stream(
        self, path: str, query: list[tuple[str, str]], read_timeout: float
    ) -> Iterator[dict[str, Any]]:
        """A watch: the JSON objects of a streamed response, one per line, as they come.
        Raises ApiException for error statuses, urllib3's errors when the connection
        breaks or stays silent for `read_timeout` seconds."""
        if self.on_request is not None:
            self.on_request("WATCH")
        prepared = self.api.param_serialize(
            method="GET",
            resource_path=path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*prepared[:4], _request_timeout=(10, read_timeout))
        raw = response.response  # urllib3's, not read yet
        try:
            if response.status >= 400:
                response.read()  # type: ignore[no-untyped-call]
                raise ApiException(
                    status=response.status, reason=response.reason, http_resp=response
                )
            pending = b""
            for chunk in raw.stream(amt=None, decode_content=False):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            raw.release_conn()

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", object_path(kind, namespace, name))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def list_objects(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        data = self.request(
            "GET", collection_path(kind, namespace), query=[("labelSelector", selector)]
        )
        return list(data.get("items", []))

    def apply(self, obj: dict[str, Any], field_manager: str = MANAGED_BY) -> dict[str, Any]:
        """Server-side apply (create or converge), by default with the operator as field
        manager."""
        meta = obj["metadata"]
        return self.request(
            "PATCH",
            object_path(obj["kind"], meta["namespace"], meta["name"]),
            query=[("fieldManager", field_manager), ("force", "true")],
            body=obj,
            content_type="application/apply-patch+yaml",
        )

    def patch_status(
        self, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch the status; returns the object as the API server stored it."""
        return self.request(
            "PATCH",
            object_path(kind, namespace, name) + "/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def merge_patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.request(
            "PATCH",
            object_path(kind, namespace, name),
            body=patch,
            content_type="application/merge-patch+json",
        )

    def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            self.request(
                "DELETE",
                object_path(kind, namespace, name),
                body={"propagationPolicy": "Background"},
            )
        except ApiException as err:
            if err.status != 404:
                raise

    def jobs_of(self, kind: str, namespace: str, name: str) -> list[dict[str, Any]]:
        """Every batch/v1 Job (all attempts) of a training job."""
        return self.list_objects("Job", namespace, f"{LABEL_KIND}={kind},{LABEL_NAME}={name}")

    def pods_of(self, kind: str, namespace: str, name: str, attempt: int) -> list[dict[str, Any]]:
        selector = f"{LABEL_KIND}={kind},{LABEL_NAME}={name},{LABEL_ATTEMPT}={attempt}"
        return self.list_objects("Pod", namespace, selector)

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the job, as `kubectl describe` and `kubectl events` show them."""
        meta = obj["metadata"]
        stamp = timestamps.now()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": MANAGED_BY},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.request("POST", collection_path("Event", meta["namespace"]), body=body)
        except ApiException as err:  # events are best effort
            log.warning("could not record event %s on %s: %s", reason, meta["name"], err.reason)
