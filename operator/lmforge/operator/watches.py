"""The operator's view of the cluster: list, then watch, each kind it reads; a work queue.

A `Watch` keeps one resource (in one namespace, or in all) as slim copies (`cache.slim`:
no managedFields, no pod specs, no Job pod templates), grouped by the training job or
service they belong to, and tells the operator what changed. It lists first (`synced` is
set then), watches from the list's resourceVersion with bookmarks, resumes from the last
version it saw when a watch ends or breaks, and lists again when that version is too old
(410 Gone), reporting what changed meanwhile, deletions included.

Events put keys on a `WorkQueue`, not objects: a key already waiting is not queued
twice, so a burst of events on one job costs one reconcile, which reads the newest
state, and nothing but keys waits in memory however far behind the workers are.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException
from lmforge.operator.cache import Key, slim
from lmforge.operator.kube import Kube, api_version, collection_path

log = logging.getLogger(__name__)

# (event type, the object's slim copy): ADDED, MODIFIED or DELETED
Handler = Callable[[str, dict[str, Any]], None]
WATCH_SECONDS = 60  # the API server ends each watch after this; we resume from there
BACKOFFS = (1.0, 2.0, 5.0)  # after a failed list or watch, then 5 s each time
LIST_PAGE = 500


class Watch:
    """One resource, listed and watched; its objects by the key `group` gives them (None:
    not kept, no events). Reads may come from any thread."""

    def __init__(
        self,
        kube: Kube,
        kind: str,
        namespace: str | None,
        *,
        group: Callable[[dict[str, Any]], Key | None],
        on_event: Handler,
        selector: str = "",
    ) -> None:
        self.kube, self.kind, self.namespace, self.selector = kube, kind, namespace, selector
        self.group, self.on_event = group, on_event
        self.synced = threading.Event()
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], tuple[Key, dict[str, Any]]] = {}
        self._groups: dict[Key, dict[tuple[str, str], dict[str, Any]]] = {}
        self._version = ""  # the last resourceVersion seen: where a watch resumes

    def __repr__(self) -> str:
        where = f"namespace {self.namespace}" if self.namespace else "all namespaces"
        return f"watch of {self.kind} in {where}"

    # --- reads --------------------------------------------------------------------------
    def get(self, key: Key) -> list[dict[str, Any]]:
        """The objects of one group (copies of the list; the objects are never mutated)."""
        with self._lock:
            return list(self._groups.get(key, {}).values())

    def __iter__(self) -> Iterator[Key]:
        """The keys of the groups (a copy: the watch may change meanwhile)."""
        with self._lock:
            return iter(list(self._groups))

    # --- the loop -----------------------------------------------------------------------
    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name=repr(self), daemon=True)
        thread.start()
        return thread

    def run(self, stop: threading.Event) -> None:
        failures = 0
        listed = False
        while not stop.is_set():
            try:
                if not listed:
                    self._list()
                    listed = True
                    self.synced.set()
                self._watch(stop)
                failures = 0
            except Gone:
                log.info("%s: resourceVersion %s is too old; listing again", self, self._version)
                listed = False
            except Exception as err:  # connection lost, API server restarting, RBAC, ...
                delay = BACKOFFS[min(failures, len(BACKOFFS) - 1)]
                failures += 1
                log.warning("%s failed (%s); again in %.0f s", self, _describe(err), delay)
                stop.wait(delay)

    def _list(self) -> None:
        """A full listing (paged): replaces what we hold, reporting every difference."""
        path = collection_path(self.kind, self.namespace)
        query = [("limit", str(LIST_PAGE)), *self._selector_query()]
        found: dict[tuple[str, str], dict[str, Any]] = {}
        token = ""
        while True:
            more = [("continue", token)] if token else []
            page = self.kube.request("GET", path, query=query + more)
            for item in page.get("items") or []:
                obj = self._typed(item)
                found[_name(obj)] = obj
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                break
        version = str((page.get("metadata") or {}).get("resourceVersion", ""))
        with self._lock:
            held = set(self._objects)
        for name in held - set(found):
            self._apply("DELETED", self._objects[name][1])
        for name, obj in found.items():
            self._apply("MODIFIED" if name in held else "ADDED", obj)
        self._version = version

    def _watch(self, stop: threading.Event) -> None:
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", self._version),
            ("timeoutSeconds", str(WATCH_SECONDS)),
            *self._selector_query(),
        ]
        path = collection_path(self.kind, self.namespace)
        try:
            events: Iterator[dict[str, Any]] = self.kube.stream(path, query, WATCH_SECONDS + 30)
            for event in events:
                if stop.is_set():
                    return
                type_, obj = event.get("type"), event.get("object") or {}
                if type_ == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise RuntimeError(f"watch error: {obj.get('message', obj)}")
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if type_ != "BOOKMARK":
                    self._apply(str(type_), self._typed(obj))
                if version:
                    self._version = str(version)
        except ApiException as err:
            if err.status == 410:
                raise Gone() from err
            raise

    def _apply(self, type_: str, obj: dict[str, Any]) -> None:
        """Keep (or drop) one object and report it, unless it is unchanged or not ours."""
        name = _name(obj)
        key = None if type_ == "DELETED" else self.group(obj)
        with self._lock:
            held = self._objects.get(name)
            if held is not None and held[0] == key and _version(held[1]) == _version(obj):
                return  # a listing again of what we hold: nothing new
            if held is not None:
                del self._objects[name]
                members = self._groups.get(held[0], {})
                members.pop(name, None)
                if not members:
                    self._groups.pop(held[0], None)
            if key is not None:
                self._objects[name] = (key, obj)
                self._groups.setdefault(key, {})[name] = obj
        if key is None and held is None:
            return  # not ours (e.g. a ConfigMap that is not a report), before or now
        try:
            self.on_event("DELETED" if key is None else type_, obj)
        except Exception:
            log.exception("%s: handling %s of %s/%s failed", self, type_, *name)

    def _typed(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The slim copy, with kind and apiVersion (list items come without them)."""
        obj["kind"], obj["apiVersion"] = self.kind, obj.get("apiVersion") or api_version(self.kind)
        return slim(obj)

    def _selector_query(self) -> list[tuple[str, str]]:
        return [("labelSelector", self.selector)] if self.selector else []


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class WorkQueue:
    """Keys to reconcile, oldest first, each at most once while it waits. Keys added with
    `later=True` (the jobs an operator finds reconciled when it starts, to repair drift;
    a resync's) wait behind the others, so a job created or changed meanwhile is not held
    up by a thousand that are not new."""

    def __init__(self) -> None:
        self._now: dict[Key, None] = {}  # insertion-ordered
        self._later: dict[Key, None] = {}
        self._ready = threading.Condition()

    def add(self, key: Key, later: bool = False) -> None:
        with self._ready:
            if key in self._now or (later and key in self._later):
                return
            if later:
                self._later[key] = None
            else:
                self._later.pop(key, None)
                self._now[key] = None
            self._ready.notify()

    def take(self, timeout: float | None = None) -> Key | None:
        """The oldest key (removed from the queue), or None after `timeout` seconds."""
        with self._ready:
            if not self._ready.wait_for(lambda: bool(self._now or self._later), timeout):
                return None
            lane = self._now or self._later
            key = next(iter(lane))
            del lane[key]
            return key

    def __len__(self) -> int:
        with self._ready:
            return len(self._now) + len(self._later)

    def __contains__(self, key: object) -> bool:
        with self._ready:
            return key in self._now or key in self._later


def work(queue: WorkQueue, handle: Callable[[Key], None], stop: threading.Event) -> None:
    """A worker: take keys and handle them until `stop`."""
    while not stop.is_set():
        key = queue.take(timeout=1.0)
        if key is not None:
            handle(key)


def wait_synced(watches: list[Watch], stop: threading.Event, report_every: float = 30) -> bool:
    """Block until every watch has its first listing (True) or `stop` is set (False)."""
    started = time.monotonic()
    for watch in watches:
        while not watch.synced.wait(1.0):
            if stop.is_set():
                return False
            if time.monotonic() - started > report_every:
                log.warning("still waiting for the first listing of the %s", watch)
                started = time.monotonic()
    return True


def _name(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def _version(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


def _describe(err: Exception) -> str:
    if isinstance(err, ApiException):
        return f"{err.status} {err.reason}"
    return f"{type(err).__name__}: {err}"
