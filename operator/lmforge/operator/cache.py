"""What the operator reads: its watches' view of the cluster plus what it wrote itself since.

Reconciles read training jobs, their batch/v1 Jobs, pods and report ConfigMaps from
the operator's watches (`watches.Watch`; no reconcile runs before every watch holds
its first listing, so a fresh operator never sees a half-filled cache) instead of
asking the API server on every event. Two things keep such reads safe:

- Read after write: a watch event of our own write may arrive after the next
  reconcile started. Every object the operator writes (status patches, applies) is
  kept as the API server returned it until the watch has caught up (same or newer
  resourceVersion), and whichever copy is newer wins. Objects the operator deleted
  stay hidden until the watch reports them gone. So a restart (status.restarts bumped,
  then the new attempt's Job created, the old one deleted) is never acted on twice.
- Skipped applies: a child whose rendered form equals what this process last applied
  is not sent again, for at most `reapply_seconds` (out-of-band changes are repaired
  then) and never when the watch saw it deleted or no longer shows it. A job whose
  render inputs (its spec and labels, resolved models, attempt) did not change since
  all its children were applied is not even rendered again: a resync of a thousand
  unchanged jobs then costs reads, not renders.

The watches keep slimmed copies (no managedFields, no pod specs, no Job pod templates)
to keep memory flat with thousands of jobs; they change in their own threads, readers
run in worker threads: every read copies under the watch's lock, and our own writes go
through one lock here.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from lmforge.operator.ownership import LABEL_ATTEMPT, LABEL_KIND, LABEL_NAME

Key = tuple[str, str, str]  # (kind, namespace, name) of a training job
ObjectKey = tuple[str, str, str]  # (kind, namespace, name) of any object

# What the reconciler reads, each from one watch per namespace (or one for all of them).
WORKLOADS_INDEX = "workloads"  # batch/v1 Jobs, by the job they belong to
PODS_INDEX = "pods"
REPORTS_INDEX = "reports"  # the trainers' report ConfigMaps


def jobs_index(kind: str) -> str:
    """The objects of one kind of ours (FinetuneJob, ...), each under its own key."""
    return kind


class Source(Protocol):
    """Objects grouped by key: a `watches.Watch` (a dict in tests)."""

    def get(self, key: Key) -> list[dict[str, Any]] | None: ...

    def __iter__(self) -> Iterator[Key]: ...


REPORT_SUFFIX = "-report"  # render.report_name


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an object without what no decision reads: managedFields, pod specs, the pod
    templates of Jobs and Deployments."""
    out = {k: v for k, v in body.items() if k != "metadata"}
    meta = dict(body.get("metadata") or {})
    meta.pop("managedFields", None)
    (meta.get("annotations") or {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
    out["metadata"] = meta
    if body.get("kind") == "Pod":
        out.pop("spec", None)
    elif body.get("kind") in ("Job", "Deployment") and isinstance(body.get("spec"), dict):
        out["spec"] = {k: v for k, v in body["spec"].items() if k not in ("template", "selector")}
    return out


def resource_version(obj: Mapping[str, Any] | None) -> int:
    """The resourceVersion as a number (etcd's revision); -1 when absent or not numeric."""
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion", -1))
    except (TypeError, ValueError):
        return -1


def newer(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None or b is None:
        return a if b is None else b
    return a if resource_version(a) >= resource_version(b) else b


def digest(obj: Mapping[str, Any]) -> str:
    return hashlib.blake2b(
        json.dumps(obj, sort_keys=True, separators=(",", ":")).encode(), digest_size=16
    ).hexdigest()


def owner_key(obj: Mapping[str, Any]) -> Key | None:
    """The training job a child belongs to, from its labels."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    kind, name = labels.get(LABEL_KIND), labels.get(LABEL_NAME)
    if not kind or not name:
        return None
    return (str(kind), str(meta.get("namespace", "")), str(name))


class ClusterCache:
    """The operator's reads, from the sources `attach` names."""

    def __init__(
        self, reapply_seconds: float = 600, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.reapply_seconds, self.clock = reapply_seconds, clock
        self._sources: dict[str, Sequence[Source]] = {}
        self._lock = threading.Lock()
        self._written: dict[ObjectKey, dict[str, Any]] = {}  # our writes the watch may lag
        self._written_children: dict[Key, set[ObjectKey]] = {}  # of _written, by their job
        self._deleted: dict[ObjectKey, float] = {}  # deleted by us, until the watch agrees
        self._applied: dict[ObjectKey, tuple[str, float]] = {}  # digest, when
        self._rendered: dict[Key, tuple[str, float]] = {}  # render inputs, oldest apply

    # --- filled from the watches ------------------------------------------------------
    def attach(self, sources: Mapping[str, Sequence[Source]]) -> None:
        """Where each index is read: WORKLOADS_INDEX, PODS_INDEX, REPORTS_INDEX and
        jobs_index(kind), each from one or more sources (one per watched namespace)."""
        with self._lock:
            self._sources = dict(sources)

    def saw_deleted(self, obj: Mapping[str, Any]) -> None:
        """The watch reports `obj` gone: drop our copies, re-apply it next time."""
        key = _object_key(obj)
        with self._lock:
            written = self._written.get(key)
            if written is not None and resource_version(written) <= resource_version(obj):
                self._drop_written(key)
            self._deleted.pop(key, None)
            self._applied.pop(key, None)
            owner = owner_key(obj)
            if owner is not None:
                self._rendered.pop(owner, None)

    # --- written by us ----------------------------------------------------------------
    def wrote(self, obj: Mapping[str, Any]) -> None:
        """An object as the API server returned it after our write."""
        if not obj.get("metadata"):
            return
        key = _object_key(obj)
        with self._lock:
            self._drop_written(key)
            self._written[key] = slimmed = slim(obj)
            owner = owner_key(slimmed)
            if owner is not None:
                self._written_children.setdefault(owner, set()).add(key)
            self._deleted.pop(key, None)

    def own_write(self, obj: Mapping[str, Any]) -> bool:
        """True when `obj` is, version for version, what our last write of it returned:
        its watch event brings nothing the reconcile that wrote it did not know."""
        with self._lock:
            written = self._written.get(_object_key(obj))
        return written is not None and resource_version(written) == resource_version(obj) >= 0

    def deleted(self, kind: str, namespace: str, name: str) -> None:
        key = (kind, namespace, name)
        with self._lock:
            self._drop_written(key)
            self._applied.pop(key, None)
            self._deleted[key] = self.clock()
            for job in [job for job in self._rendered if _belongs(key, job)]:
                del self._rendered[job]

    def unchanged(self, obj: Mapping[str, Any]) -> bool:
        """True when this process applied exactly `obj` less than reapply_seconds ago."""
        with self._lock:
            seen = self._applied.get(_object_key(obj))
        return (
            seen is not None
            and seen[0] == digest(obj)
            and self.clock() - seen[1] < self.reapply_seconds
        )

    def applied(self, obj: Mapping[str, Any]) -> None:
        with self._lock:
            self._applied[_object_key(obj)] = (digest(obj), self.clock())

    def children_current(self, job: Key, inputs: str) -> bool:
        """True when every child of `job` was applied from these render `inputs` (see
        `rendered`) less than reapply_seconds ago, and the watch saw none of them deleted."""
        with self._lock:
            seen = self._rendered.get(job)
        return (
            seen is not None and seen[0] == inputs and self.clock() - seen[1] < self.reapply_seconds
        )

    def rendered(self, job: Key, inputs: str, children: Sequence[Mapping[str, Any]]) -> None:
        """Every one of `children`, rendered from `inputs`, is applied (now or earlier)."""
        with self._lock:
            times = [self._applied.get(_object_key(child)) for child in children]
            if all(t is not None for t in times):
                self._rendered[job] = (inputs, min(t[1] for t in times if t is not None))

    def forget(self, key: Key) -> None:
        """Drop what we remember of a deleted training job and its children."""
        with self._lock:
            self._drop_written(key)
            for k in self._written_children.pop(key, set()):
                self._written.pop(k, None)
            for k in [k for k in self._applied if _belongs(k, key)]:
                del self._applied[k]
            self._rendered.pop(key, None)

    # --- reads ------------------------------------------------------------------------
    def known(self, indexes: list[str]) -> list[Key]:
        """The keys of these indexes (of the jobs, by kind)."""
        return [key for index in indexes for src in self._sources.get(index, ()) for key in src]

    def job(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        key = (kind, namespace, name)
        seen = _one(self._values(jobs_index(kind), key))
        return self._merge_one(key, seen)

    def workloads(self, kind: str, namespace: str, name: str) -> list[dict[str, Any]]:
        """Every batch/v1 Job (all attempts) of a training job."""
        key = (kind, namespace, name)
        return self._merge_many("Job", key, self._values(WORKLOADS_INDEX, key))

    def pods(self, kind: str, namespace: str, name: str, attempt: int) -> list[dict[str, Any]]:
        return [
            p
            for p in self._values(PODS_INDEX, (kind, namespace, name))
            if (p["metadata"].get("labels") or {}).get(LABEL_ATTEMPT) == str(attempt)
        ]

    def report(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        seen = _one(self._values(REPORTS_INDEX, (kind, namespace, name)))
        return self._merge_one(("ConfigMap", namespace, f"{name}{REPORT_SUFFIX}"), seen)

    def _values(self, index: str, key: Key) -> list[dict[str, Any]]:
        sources = self._sources.get(index)
        if sources is None:
            raise RuntimeError(f"nothing attached for {index}")
        return [value for source in sources for value in source.get(key) or ()]

    def _merge_one(self, key: ObjectKey, seen: dict[str, Any] | None) -> dict[str, Any] | None:
        with self._lock:
            if key in self._deleted:
                # hidden until the watch agrees it is gone (or the tombstone is old)
                if seen is not None and not self._expired_tombstone(key):
                    return None
                del self._deleted[key]
                return seen
            written = self._written.get(key)
            if (
                written is not None
                and seen is not None
                and resource_version(seen) >= resource_version(written)
            ):
                self._drop_written(key)  # the watch caught up
                return seen
            return newer(seen, written)

    def _merge_many(
        self, child_kind: str, owner: Key, seen: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        by_name = {str(o["metadata"]["name"]): o for o in seen}
        with self._lock:
            mine = {
                k[2]: self._written[k]
                for k in self._written_children.get(owner, ())
                if k[0] == child_kind
            }
        out = []
        for name in sorted(set(by_name) | set(mine)):
            merged = self._merge_one((child_kind, owner[1], name), by_name.get(name))
            if merged is not None:
                out.append(merged)
        return out

    def _drop_written(self, key: ObjectKey) -> None:
        """Forget our copy of `key` (the lock held)."""
        written = self._written.pop(key, None)
        owner = owner_key(written) if written is not None else None
        if owner is not None:
            children = self._written_children.get(owner, set())
            children.discard(key)
            if not children:
                self._written_children.pop(owner, None)

    def _expired_tombstone(self, key: ObjectKey) -> bool:
        return self.clock() - self._deleted[key] > self.reapply_seconds


def _object_key(obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return (str(obj.get("kind", "")), str(meta.get("namespace", "")), str(meta.get("name", "")))


def _belongs(object_key: ObjectKey, job: Key) -> bool:
    """Children are named after their job (name, name-<attempt>, name-report, ...); a
    false match (job "a" and job "a-b") only costs a re-apply."""
    _, namespace, name = object_key
    return namespace == job[1] and (name == job[2] or name.startswith(job[2] + "-"))


def _one(values: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(values, key=resource_version) if values else None
