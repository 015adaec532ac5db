"""`lmforge operator`: watches wired to the reconcilers, behind leader election.

The wiring is thin: every change to a job, its batch/v1 Jobs, pods, report ConfigMaps
or Deployments puts the job's key on a work queue (`watches`), and worker threads and
a periodic resync call the same idempotent `reconcile`, which reads from the watches'
view of the cluster (see `cache`) rather than the API server. Nothing is written to the
objects but our own fields (no annotations or finalizers of a framework), so the CRDs'
schemas stay ours and deleting a job never waits for the operator.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Container
from typing import Any

from kubernetes import config as kube_config
from lmforge.operator.cache import (
    PODS_INDEX,
    REPORT_SUFFIX,
    REPORTS_INDEX,
    WORKLOADS_INDEX,
    ClusterCache,
    Key,
    Source,
    jobs_index,
    owner_key,
)
from lmforge.operator.kube import Kube
from lmforge.operator.leader import LeaderElection
from lmforge.operator.metrics import OperatorMetrics, serve
from lmforge.operator.ownership import LABEL_KIND, LABEL_NAME
from lmforge.operator.serving.reconcile import ServingReconciler
from lmforge.operator.settings import OperatorSettings
from lmforge.operator.training.reconcile import Reconciler
from lmforge.operator.watches import Watch, WorkQueue, wait_synced, work

from lmforge.api.kinds import TRAINING_KINDS

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
        self.cache = ClusterCache()  # the training reconciler's reads (the watches)
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

    def stale(
        self, seconds: float, waiting: Container[tuple[str, str, str]] = ()
    ) -> list[tuple[str, str, str]]:
        """The objects (of every managed kind the watches know) not reconciled for
        `seconds`, and neither running nor `waiting` for a worker: what a resync reconciles.
        (Right after a start every job waits in the queue; the resync leaves them to it.)"""
        known = self.cache.known([jobs_index(kind) for kind in MANAGED_KINDS])
        now = time.monotonic()
        with self._guard:
            return [
                key
                for key in known
                if key not in self._running
                and key not in waiting
                and now - self._last.get(key, -seconds) >= seconds
            ]

    def note_disruption(self, kind: str, namespace: str, name: str, pod: dict[str, Any]) -> None:
        self.by_kind[kind].note_disruption(kind, namespace, name, pod)


WORKERS = 8  # reconciles at once (they wait on the API server more than they compute)
SELECTOR = f"{LABEL_KIND},{LABEL_NAME}"  # children of our jobs: both labels present


class Operator:
    """The watches of every namespace watched (or of all), the work queue and its workers,
    and the resync. `run` blocks until `stop` is set."""

    def __init__(
        self,
        kube: Kube,
        dispatch: Dispatch,
        namespaces: list[str] | None,
        resync_seconds: float,
        stop: threading.Event,
    ) -> None:
        self.dispatch, self.resync_seconds = dispatch, resync_seconds
        self.queue = WorkQueue()
        self.stop = stop
        self.started = threading.Event()  # every watch listed, workers running
        where: list[str | None] = list(namespaces) if namespaces else [None]
        # ours first: the children's first events read the jobs (a disruption's record)
        self.jobs = [
            Watch(kube, kind, ns, group=_own_key(kind), on_event=self._on_job_event(kind))
            for ns in where
            for kind in MANAGED_KINDS
        ]
        children: dict[str, list[Watch]] = {}
        for kind, group in CHILD_KINDS.items():
            children[kind] = [
                Watch(kube, kind, ns, group=group, on_event=self._on_child_event, selector=SELECTOR)
                for ns in where
            ]
        self.children = [w for watches in children.values() for w in watches]
        sources: dict[str, list[Source]] = {
            WORKLOADS_INDEX: list(children["Job"]),
            PODS_INDEX: list(children["Pod"]),
            REPORTS_INDEX: list(children["ConfigMap"]),
        }
        for kind in MANAGED_KINDS:
            sources[jobs_index(kind)] = [w for w in self.jobs if w.kind == kind]
        dispatch.cache.attach(sources)

    def run(self) -> None:
        for watch in self.jobs:
            watch.start(self.stop)
        if not wait_synced(self.jobs, self.stop):
            return
        for watch in self.children:
            watch.start(self.stop)
        if not wait_synced(self.children, self.stop):
            return
        # Every listed object's event queued its job: all are reconciled once now.
        for i in range(WORKERS):
            threading.Thread(
                target=work, args=(self.queue, self._reconcile, self.stop), name=f"worker-{i}"
            ).start()
        threading.Thread(target=self._resync_forever, name="resync", daemon=True).start()
        self.started.set()
        self.stop.wait()

    def _reconcile(self, key: Key) -> None:
        try:
            self.dispatch.reconcile(*key)
        except Exception:
            log.exception("reconcile of %s %s/%s failed; will retry", *key)

    def _resync_forever(self) -> None:
        while not self.stop.wait(min(1.0, self.resync_seconds / 4)):
            self.resync()

    def resync(self) -> None:
        """Queue every object not reconciled for resync_seconds (deadlines, waits on other
        jobs, anything no event announces) behind what events brought: under a backlog (a
        thousand jobs created at once) the workers reach it after the new work, rather than
        a resync thread reconciling beside them, and an event moves it ahead."""
        for key in self.dispatch.stale(self.resync_seconds, waiting=self.queue):
            self.queue.add(key, later=True)

    def _on_job_event(self, kind: str) -> Callable[[str, dict[str, Any]], None]:
        def on_event(type_: str, obj: dict[str, Any]) -> None:
            meta = obj["metadata"]
            if type_ == "DELETED":
                self.dispatch.forget(kind, meta["namespace"], meta["name"])
            elif self.dispatch.cache.own_write(obj):
                return  # the echo of our own status write
            else:  # what the first listing finds waits behind what happens since,
                # unless no operator has acted on it yet (created or changed meanwhile)
                later = not self.started.is_set() and _acted_on(obj)
                self.queue.add((kind, meta["namespace"], meta["name"]), later=later)

        return on_event

    def _on_child_event(self, type_: str, obj: dict[str, Any]) -> None:
        owner = owner_key(obj)
        if type_ == "DELETED":
            self.dispatch.cache.saw_deleted(obj)  # applied again by the reconcile it queues
        if owner is None or owner[0] not in MANAGED_KINDS:
            return
        if type_ != "DELETED" and self.dispatch.cache.own_write(obj):
            return  # the echo of our own apply
        if obj.get("kind") == "Pod" and _disrupted(obj):
            try:
                self.dispatch.note_disruption(*owner, obj)
            except Exception:
                log.exception("could not record a disruption on %s/%s", *owner[1:])
        self.queue.add(owner, later=not self.started.is_set())


def _acted_on(job: dict[str, Any]) -> bool:
    """Whether an operator has reconciled this spec of the job: its status observed the
    job's generation. A job created or changed while no operator ran has not been."""
    observed = (job.get("status") or {}).get("observedGeneration")
    return observed is not None and observed == job["metadata"].get("generation")


def _own_key(kind: str) -> Callable[[dict[str, Any]], Key]:
    def key(obj: dict[str, Any]) -> Key:
        return (kind, obj["metadata"]["namespace"], obj["metadata"]["name"])

    return key


def _report_owner(obj: dict[str, Any]) -> Key | None:
    """A report ConfigMap's job; None for other labelled ConfigMaps (our own run configs:
    their changes say nothing new about the job)."""
    key = owner_key(obj)
    return key if key and obj["metadata"].get("name") == key[2] + REPORT_SUFFIX else None


# The children the operator watches, and how each finds its job.
CHILD_KINDS: dict[str, Callable[[dict[str, Any]], Key | None]] = {
    "Job": owner_key,
    "Pod": owner_key,
    "ConfigMap": _report_owner,  # the reports only; not the run configs
    "Deployment": owner_key,  # serving: replicas becoming ready
}


def _disrupted(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


class JsonLines(logging.Formatter):
    """One JSON object per log line (--log-format json)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(log_format: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLines()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("urllib3").setLevel(logging.ERROR)


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
    setup_logging(args.log_format)
    try:
        kube_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kube_config.ConfigException:
        kube_config.load_kube_config()  # type: ignore[no-untyped-call]
    metrics = OperatorMetrics()
    kube = Kube(on_request=lambda method: metrics.api_requests.labels(method).inc())
    election = LeaderElection(kube, args.lease_namespace, args.identity)
    operator: Operator | None = None
    # Ready: a standby (waiting for the Lease) is ready to take over; a leader once its
    # watches listed everything. So a PodDisruptionBudget can evict one replica at a time.
    serve(
        metrics,
        args.metrics_port,
        live=lambda: True,
        ready=lambda: (
            not election.leading.is_set() or (operator is not None and operator.started.is_set())
        ),
    )
    election.wait_until_leader()
    metrics.leader.set(1)

    stop = threading.Event()  # SIGTERM: workers finish the reconcile they are in, then exit
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    settings = OperatorSettings(
        trainer_image=args.trainer_image, inferencer_image=args.inferencer_image
    )
    dispatch = Dispatch(kube, settings, metrics)
    operator = Operator(kube, dispatch, args.namespace, args.resync_seconds, stop)
    where = ", ".join(args.namespace) if args.namespace else "all namespaces"
    log.info("leading; watching %s", where)
    operator.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
