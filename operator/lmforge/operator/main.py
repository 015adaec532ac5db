"""`lmforge operator`: kopf handlers wired to the reconciler, behind leader election.

The handlers are thin: every event (on a job, on its batch/v1 Jobs, on its pods)
and a periodic resync call the same idempotent `Reconciler.reconcile`, which reads
from kopf indexes of those objects (see `cache`) rather than the API server. kopf is
used for watching only: no kopf annotations, finalizers or status fields are written
(`on.event` handlers keep no progress state, and the resync is one loop of ours rather
than a kopf timer per object, which would put a finalizer on every job), so the CRDs'
schemas stay ours and deleting a job never waits for the operator.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import threading
import time
from typing import Any

import kopf
from kubernetes import config as kube_config
from lmforge.operator.cache import (
    PODS_INDEX,
    REPORT_SUFFIX,
    REPORTS_INDEX,
    WORKLOADS_INDEX,
    ClusterCache,
    jobs_index,
    owner_key,
    slim,
)
from lmforge.operator.kube import Kube
from lmforge.operator.leader import LeaderElection
from lmforge.operator.metrics import OperatorMetrics, serve
from lmforge.operator.ownership import LABEL_KIND, LABEL_NAME
from lmforge.operator.serving.reconcile import ServingReconciler
from lmforge.operator.settings import OperatorSettings
from lmforge.operator.training.reconcile import Reconciler

from lmforge.api.base import GROUP, VERSION
from lmforge.api.kinds import KINDS, TRAINING_KINDS

log = logging.getLogger("lmforge.operator")

# The table of reconcilers: every training kind through one, InferenceService through another.
RECONCILERS: dict[str, type[Reconciler] | type[ServingReconciler]] = {
    **dict.fromkeys(TRAINING_KINDS, Reconciler),
    "InferenceService": ServingReconciler,
}
MANAGED_KINDS = tuple(RECONCILERS)


class Dispatch:
    """One reconciler instance per reconciler class, looked up by kind."""

    def __init__(self, kube: Kube, settings: OperatorSettings, metrics: OperatorMetrics) -> None:
        instances: dict[type[Any], Any] = {}
        self.by_kind: dict[str, Reconciler | ServingReconciler] = {}
        self.cache = ClusterCache()  # the training reconciler's reads (kopf indexes)
        self.metrics = metrics
        self._guard = threading.Lock()
        self._running: set[tuple[str, str, str]] = set()
        self._again: set[tuple[str, str, str]] = set()
        self._last: dict[tuple[str, str, str], float] = {}  # when each last reconciled
        for kind, cls in RECONCILERS.items():
            if cls not in instances:
                extra = (self.cache,) if cls is Reconciler else ()
                instances[cls] = cls(kube, settings, metrics, *extra)
            self.by_kind[kind] = instances[cls]

    def reconcile(self, kind: str, namespace: str, name: str) -> None:
        """One reconcile of an object at a time; events that arrive meanwhile are folded
        into a single re-run (it reads the newest state), as a controller's work queue
        does. A burst of child events then costs two reconciles, not one per event, and
        no handler thread waits on another's reconcile of the same object."""
        key = (kind, namespace, name)
        with self._guard:
            if key in self._running:
                self._again.add(key)
                return
            self._running.add(key)
        try:
            while True:
                self.by_kind[kind].reconcile(kind, namespace, name)
                with self._guard:
                    if key not in self._again:
                        self._running.discard(key)
                        self._last[key] = time.monotonic()
                        return
                    self._again.discard(key)
        except BaseException:
            with self._guard:  # the resync timer and the next event retry it
                self._running.discard(key)
                self._again.discard(key)
            raise

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """The object is gone: drop its cached state and its per-object series (a deleted
        Failed job must not keep LMForgeJobFailed firing)."""
        self.cache.forget((kind, namespace, name))
        self.metrics.forget(kind, namespace, name)
        with self._guard:
            self._last.pop((kind, namespace, name), None)

    def stale(self, seconds: float) -> list[tuple[str, str, str]]:
        """The objects (of every managed kind the watches know) not reconciled for
        `seconds`: what a resync reconciles. Call on kopf's event loop (index reads)."""
        known = self.cache.known([jobs_index(kind) for kind in MANAGED_KINDS])
        now = time.monotonic()
        with self._guard:
            return [
                key
                for key in known
                if key not in self._running and now - self._last.get(key, -seconds) >= seconds
            ]

    def note_disruption(self, kind: str, namespace: str, name: str, pod: dict[str, Any]) -> None:
        self.by_kind[kind].note_disruption(kind, namespace, name, pod)


def register(reconciler: Dispatch, resync_seconds: float) -> kopf.OperatorRegistry:
    """A kopf registry whose handlers all funnel into `reconciler`."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    cache = reconciler.cache
    register_indexes(registry)

    def reconcile_quietly(kind: str, namespace: str, name: str) -> None:
        try:
            reconciler.reconcile(kind, namespace, name)
        except Exception:
            log.exception("reconcile of %s %s/%s failed; will retry", kind, namespace, name)

    # kopf runs handlers only once every index holds its initial listing; the resync waits
    # for the first handler too, so that it never reconciles from a half-filled cache.
    handling = threading.Event()

    def on_job_event(kind: str) -> Any:
        def on_event(**kw: Any) -> None:
            cache.attach(kw)
            handling.set()
            if kw["type"] == "DELETED":
                reconciler.forget(kind, kw["namespace"], kw["name"])
            else:
                reconcile_quietly(kind, kw["namespace"], kw["name"])

        return on_event

    for kind in MANAGED_KINDS:
        kopf.on.event(GROUP, VERSION, KINDS[kind].plural, registry=registry)(on_job_event(kind))

    # The resync: every object not reconciled for resync_seconds (deadlines, waits on other
    # jobs, anything no event announces), one at a time, in one loop for all objects.
    resyncing: set[asyncio.Task[None]] = set()

    async def resync_forever() -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, resync_seconds / 4))
            if not handling.is_set():
                continue
            for key in reconciler.stale(resync_seconds):
                await loop.run_in_executor(None, reconcile_quietly, *key)

    async def start_resync(**kw: Any) -> None:
        cache.attach(kw)
        task = asyncio.create_task(resync_forever())
        resyncing.add(task)  # a reference, so the task is not collected
        task.add_done_callback(resyncing.discard)

    kopf.on.startup(registry=registry)(start_resync)

    def on_child_event(**kw: Any) -> None:
        cache.attach(kw)
        handling.set()
        labels = kw["labels"]
        kind, name = labels.get(LABEL_KIND), labels.get(LABEL_NAME)
        if kw["type"] == "DELETED":
            cache.saw_deleted(kw["body"])  # applied again by the reconcile below
        elif kw["body"].get("kind") == "ConfigMap" and kw["name"] != f"{name}{REPORT_SUFFIX}":
            return  # our own run config changing says nothing new about the job
        if kind in MANAGED_KINDS and name:
            if kw["body"].get("kind") == "Pod":
                try:
                    reconciler.note_disruption(kind, kw["namespace"], name, dict(kw["body"]))
                except Exception:
                    log.exception("could not record a disruption on %s/%s", kw["namespace"], name)
            reconcile_quietly(kind, kw["namespace"], name)

    selector = {LABEL_KIND: kopf.PRESENT, LABEL_NAME: kopf.PRESENT}
    kopf.on.event("batch", "v1", "jobs", labels=selector, registry=registry)(on_child_event)
    kopf.on.event("", "v1", "pods", labels=selector, registry=registry)(on_child_event)
    # Serving: Deployment readiness.
    kopf.on.event("apps", "v1", "deployments", labels=selector, registry=registry)(on_child_event)
    # the report ConfigMaps: progress and checkpoints of trainers, adapter state of replicas
    kopf.on.event("", "v1", "configmaps", labels=selector, registry=registry)(on_child_event)
    return registry


def register_indexes(registry: kopf.OperatorRegistry) -> None:
    """kopf indexes of the training jobs and their Jobs, pods and report ConfigMaps, keyed
    by (kind, namespace, job name): the reconciler's reads. kopf starts no handler before
    all of them hold the initial listing."""
    selector = {LABEL_KIND: kopf.PRESENT, LABEL_NAME: kopf.PRESENT}

    def training_index(kind: str) -> Any:
        async def index(body: kopf.Body, namespace: str, name: str, **_: Any) -> Any:
            return {(kind, namespace, name): slim(body)}

        return index

    for kind in MANAGED_KINDS:
        kopf.index(GROUP, VERSION, KINDS[kind].plural, id=jobs_index(kind), registry=registry)(
            training_index(kind)
        )

    async def by_owner(body: kopf.Body, **_: Any) -> Any:
        return {owner_key(body): slim(body)}

    async def reports(body: kopf.Body, name: str, **_: Any) -> Any:
        key = owner_key(body)
        return {key: slim(body)} if key and name == key[2] + REPORT_SUFFIX else {}

    kopf.index("batch", "v1", "jobs", labels=selector, id=WORKLOADS_INDEX, registry=registry)(
        by_owner
    )
    kopf.index("", "v1", "pods", labels=selector, id=PODS_INDEX, registry=registry)(by_owner)
    kopf.index("", "v1", "configmaps", labels=selector, id=REPORTS_INDEX, registry=registry)(
        reports
    )


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf compares every event's object with the last handled one, for change handlers
    (on.create/on.update/...). The operator has none (on.event only), so it skips the
    deep copies of every job, Job and pod that comparison costs on every event."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def wake_index_waiters_only_on_change() -> None:
    """kopf holds every object's handlers until all indexes are filled: one toggle per
    object in a set, and every change to the set wakes every object waiting on it. An
    operator (re)starting among N labelled objects (Jobs, pods, ConfigMaps of earlier jobs)
    then makes N^2 wake-ups: with 1,000 jobs' objects it spent minutes of CPU there before
    acting on a new job. Waiters only wait for the set's overall state to flip, so waking
    them on a flip alone changes nothing else. Written for the pinned kopf
    (requirements.lock); tests/unit/test_dispatch.py holds it to kopf's semantics."""
    from kopf._cogs.aiokits import aiotoggles

    toggle_set = aiotoggles.ToggleSet
    if getattr(toggle_set, "_lmforge_quiet", False):
        return

    async def make_toggle(
        self: aiotoggles.ToggleSet, __val: bool = False, *, name: str | None = None
    ) -> aiotoggles.Toggle:
        toggle = aiotoggles.Toggle(__val, name=name, condition=self._condition)
        async with self._condition:
            before = self.is_on()
            self._toggles.add(toggle)
            if self.is_on() != before:
                self._condition.notify_all()
        return toggle

    async def drop_toggles(self: aiotoggles.ToggleSet, toggles: Any) -> None:
        async with self._condition:
            before = self.is_on()
            self._toggles.difference_update(toggles)
            if self.is_on() != before:
                self._condition.notify_all()

    async def drop_toggle(self: aiotoggles.ToggleSet, toggle: aiotoggles.Toggle) -> None:
        await drop_toggles(self, [toggle])

    toggle_set.make_toggle = make_toggle  # type: ignore[method-assign]
    toggle_set.drop_toggle = drop_toggle  # type: ignore[method-assign]
    toggle_set.drop_toggles = drop_toggles  # type: ignore[method-assign]
    toggle_set._lmforge_quiet = True  # type: ignore[attr-defined]


def configure_kopf(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False  # our own Events, with our reasons
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.execution.max_workers = 8
    settings.networking.error_backoffs = [1, 2, 5]
    # The CRDs are installed before the operator (Helm crds/): no need to watch
    # CustomResourceDefinitions and Namespaces cluster-wide, which RBAC need not grant.
    settings.scanning.disabled = True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmforge operator", description=__doc__)
    parser.add_argument(
        "--namespace",
        action="append",
        help="watch only this namespace; repeat for several (default: all namespaces)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=8080, help="port of /metrics, /healthz and /readyz"
    )
    parser.add_argument(
        "--identity",
        default=os.environ.get("POD_NAME") or socket.gethostname(),
        help="leader-election identity (default: pod name or hostname)",
    )
    parser.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the leader-election Lease",
    )
    parser.add_argument("--trainer-image", default=OperatorSettings.trainer_image)
    parser.add_argument("--inferencer-image", default=OperatorSettings.inferencer_image)
    parser.add_argument("--resync-seconds", type=float, default=10)
    parser.add_argument("--log-format", choices=["json", "plain"], default="json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    kopf.configure(
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN
    )
    # Every handler run would log "succeeded"; keep warnings and errors only.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        kube_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kube_config.ConfigException:
        kube_config.load_kube_config()  # type: ignore[no-untyped-call]
    metrics = OperatorMetrics()
    kube = Kube(on_request=lambda method: metrics.api_requests.labels(method).inc())
    election = LeaderElection(kube, args.lease_namespace, args.identity)
    started = threading.Event()
    # Ready: a standby (waiting for the Lease) is ready to take over; a leader once its
    # handlers run. So a PodDisruptionBudget can evict one replica at a time.
    serve(
        metrics,
        args.metrics_port,
        live=lambda: True,
        ready=lambda: not election.leading.is_set() or started.is_set(),
    )
    election.wait_until_leader()
    metrics.leader.set(1)

    settings = OperatorSettings(
        trainer_image=args.trainer_image, inferencer_image=args.inferencer_image
    )
    reconciler = Dispatch(kube, settings, metrics)
    registry = register(reconciler, args.resync_seconds)
    kopf.on.startup(registry=registry)(configure_kopf)

    def mark_started(**_: Any) -> None:
        started.set()

    kopf.on.startup(registry=registry)(mark_started)
    wake_index_waiters_only_on_change()
    kopf.run(
        registry=registry,
        standalone=True,  # leadership comes from our Lease, not kopf peering
        clusterwide=not args.namespace,
        namespaces=args.namespace or [],
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
