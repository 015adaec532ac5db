"""The training reconciler against an in-memory API: what it sends, and what it skips."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from lmforge.operator.cache import (
    PODS_INDEX,
    REPORTS_INDEX,
    WORKLOADS_INDEX,
    ClusterCache,
    jobs_index,
)
from lmforge.operator.metrics import OperatorMetrics
from lmforge.operator.settings import OperatorSettings
from lmforge.operator.training import reconcile
from lmforge.operator.training.reconcile import Reconciler

KEY = ("FinetuneJob", "ml", "demo")


class FakeKube:
    """Applies succeed (a new resourceVersion each) unless `conflict`: then a Job apply
    locked to a version gets 409, as when Kueue changed the Job since it was read."""

    def __init__(self) -> None:
        self.applies: list[tuple[str, str]] = []
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[Any, ...]] = []
        self.conflict = False
        self.version = 100

    def _stored(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self.version)
        return stored

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.conflict and obj["kind"] == "Job" and "resourceVersion" in obj["metadata"]:
            raise ApiException(status=409, reason="Conflict")
        self.applies.append((obj["kind"], obj["metadata"]["name"]))
        return self._stored(obj)

    def patch_status(self, kind: str, namespace: str, name: str, status: Any) -> dict[str, Any]:
        self.statuses.append(status)
        return self._stored({**JOB, "status": status})

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return {"kind": kind, "metadata": {"name": name}}  # every claim exists

    def event(self, obj: Any, *args: Any) -> None:
        self.events.append(args)

    def delete(self, *args: Any) -> None:
        pass


JOB: dict[str, Any] = {
    "apiVersion": "lmforge.io/v1alpha1",
    "kind": "FinetuneJob",
    "metadata": {
        "name": "demo",
        "namespace": "ml",
        "uid": "uid-1",
        "generation": 1,
        "resourceVersion": "1",
        "labels": {"team": "a"},
    },
    "spec": {
        "model": {"source": "hf://org/base-model"},
        "dataset": {"sources": [{"uri": "hf://org/dataset"}]},
        "distributed": {"gpusPerNode": 0},
    },
}


@pytest.fixture
def world(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Reconciler, FakeKube, dict[str, Any], list[int]]:
    jobs: dict[Any, list[dict[str, Any]]] = {KEY: [copy.deepcopy(JOB)]}
    cache = ClusterCache()
    empty: dict[Any, list[dict[str, Any]]] = {}
    cache.attach(
        {
            jobs_index("FinetuneJob"): [jobs],
            WORKLOADS_INDEX: [empty],
            PODS_INDEX: [empty],
            REPORTS_INDEX: [empty],
        }
    )
    kube = FakeKube()
    renders: list[int] = []
    original = reconcile.render_children

    def counted(*args: Any, **kwargs: Any) -> Any:
        renders.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(reconcile, "render_children", counted)
    reconciler = Reconciler(kube, OperatorSettings(), OperatorMetrics(), cache)  # type: ignore[arg-type]
    return reconciler, kube, jobs, renders


def test_a_new_job_gets_its_children_and_one_status_write_without_an_event(world: Any) -> None:
    """The first reconcile creates the Job, then writes one status saying what the job
    waits for (not "creating" and then a second write), and no Event: the routine start
    is in status only (a burst of 1,000 jobs spent 7 % of its time on that Event)."""
    reconciler, kube, _, _ = world
    reconciler.reconcile(*KEY)
    assert ("Job", "demo-0") in kube.applies
    [status] = kube.statuses
    assert status["phase"] == "Initializing"
    [reconciling] = [c for c in status["conditions"] if c["type"] == "Reconciling"]
    assert reconciling["reason"] == "PodsStarting"
    assert reconciling["message"] == "0 of 1 pods running"
    assert kube.events == []


def test_an_unchanged_job_is_neither_rendered_nor_applied_again(world: Any) -> None:
    reconciler, kube, _, renders = world
    reconciler.reconcile(*KEY)
    created = list(kube.applies)
    assert ("Job", "demo-0") in created and len(created) == len(set(created))
    reconciler.reconcile(*KEY)  # renders once more (its Job is known now), sends nothing
    assert kube.applies == created
    settled = len(renders)
    for _ in range(3):  # a resync every 10 s, events on its pods
        reconciler.reconcile(*KEY)
    assert kube.applies == created and len(renders) == settled


def test_a_label_change_renders_again_and_a_conflict_is_not_taken_as_applied(world: Any) -> None:
    reconciler, kube, jobs, renders = world
    reconciler.reconcile(*KEY)
    reconciler.reconcile(*KEY)
    # the user relabels the job (children carry its labels); the watch brings the edit
    edited = copy.deepcopy(reconciler.cache.job(*KEY))
    edited["metadata"] |= {"labels": {"team": "b"}, "resourceVersion": "1000"}
    jobs[KEY] = [edited]
    kube.conflict, kube.applies = True, []
    rendered = len(renders)
    reconciler.reconcile(*KEY)
    assert len(renders) == rendered + 1
    assert ("ConfigMap", "demo-run-config") in kube.applies
    assert ("Job", "demo-0") not in kube.applies  # 409: Kueue changed it since it was read
    kube.conflict, kube.applies = False, []
    reconciler.reconcile(*KEY)  # the Job is not up to date: rendered and sent again
    assert len(renders) == rendered + 2 and kube.applies == [("Job", "demo-0")]
    reconciler.reconcile(*KEY)
    assert len(renders) == rendered + 2 and kube.applies == [("Job", "demo-0")]
