"""The operator's read cache: watch indexes plus its own writes, and skipped applies."""

from __future__ import annotations

from typing import Any

from lmforge.operator.cache import (
    PODS_INDEX,
    REPORTS_INDEX,
    WORKLOADS_INDEX,
    ClusterCache,
    jobs_index,
    slim,
)

KEY = ("FinetuneJob", "ns", "demo")


def obj(kind: str, name: str, rv: int, **extra: Any) -> dict[str, Any]:
    labels = {"lmforge.io/job-kind": "FinetuneJob", "lmforge.io/job-name": "demo"}
    labels |= extra.pop("labels", {})
    return {
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": str(rv),
            "labels": labels,
            "managedFields": [{"manager": "x"}],
        },
        **extra,
    }


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cache_with(
    indexes: dict[str, dict[Any, list[dict[str, Any]]]], clock: Clock | None = None
) -> ClusterCache:
    cache = ClusterCache(reapply_seconds=60, clock=clock or Clock())
    empty: dict[Any, list[dict[str, Any]]] = {}
    cache.attach(
        {
            jobs_index("FinetuneJob"): [indexes.get("jobs", empty)],
            WORKLOADS_INDEX: [indexes.get("workloads", empty)],
            PODS_INDEX: [indexes.get("pods", empty)],
            REPORTS_INDEX: [indexes.get("reports", empty)],
        }
    )
    return cache


def test_own_status_write_wins_until_the_watch_catches_up() -> None:
    jobs = {KEY: [obj("FinetuneJob", "demo", 10, status={"restarts": 0})]}
    cache = cache_with({"jobs": jobs})
    cache.wrote(obj("FinetuneJob", "demo", 12, status={"restarts": 1}))
    assert cache.job(*KEY)["status"] == {"restarts": 1}  # type: ignore[index]
    jobs[KEY] = [obj("FinetuneJob", "demo", 14, status={"restarts": 1, "phase": "Running"})]
    assert cache.job(*KEY)["status"]["phase"] == "Running"  # type: ignore[index]


def test_the_echo_of_our_own_write_is_known_as_such() -> None:
    cache = cache_with({})
    assert not cache.own_write(obj("FinetuneJob", "demo", 12))  # nothing written yet
    cache.wrote(obj("FinetuneJob", "demo", 12, status={"phase": "Pending"}))
    assert cache.own_write(obj("FinetuneJob", "demo", 12, status={"phase": "Pending"}))
    assert not cache.own_write(obj("FinetuneJob", "demo", 13))  # someone wrote after us
    assert not cache.own_write(obj("FinetuneJob", "demo", 11))  # an older state
    assert not cache.own_write(obj("Job", "demo", 12))  # another object
    cache.wrote(obj("Job", "demo-0", 20))
    assert cache.own_write(obj("Job", "demo-0", 20))
    cache.deleted("Job", "ns", "demo-0")
    assert not cache.own_write(obj("Job", "demo-0", 20))


def test_restart_is_seen_at_once_new_attempt_present_old_hidden() -> None:
    old = obj("Job", "demo-0", 20, labels={"lmforge.io/attempt": "0"})
    workloads = {KEY: [old]}
    cache = cache_with({"workloads": workloads})
    cache.wrote(obj("Job", "demo-1", 25, labels={"lmforge.io/attempt": "1"}))
    cache.deleted("Job", "ns", "demo-0")
    assert [w["metadata"]["name"] for w in cache.workloads(*KEY)] == ["demo-1"]
    # the watch reports the deletion and the new Job: both copies give way to it
    workloads[KEY] = [obj("Job", "demo-1", 26, labels={"lmforge.io/attempt": "1"})]
    cache.saw_deleted(old)
    assert [w["metadata"]["resourceVersion"] for w in cache.workloads(*KEY)] == ["26"]


def test_deleted_out_of_band_disappears_even_after_our_write() -> None:
    workloads: dict[Any, list[dict[str, Any]]] = {KEY: []}
    cache = cache_with({"workloads": workloads})
    cache.wrote(obj("Job", "demo-0", 5))
    assert len(cache.workloads(*KEY)) == 1
    cache.saw_deleted(obj("Job", "demo-0", 9))
    assert cache.workloads(*KEY) == []


def test_unchanged_apply_is_skipped_until_changed_deleted_or_stale() -> None:
    clock = Clock()
    cache = cache_with({}, clock)
    job = obj("Job", "demo-0", 1, spec={"suspend": False})
    assert not cache.unchanged(job)
    cache.applied(job)
    assert cache.unchanged(job)
    assert not cache.unchanged(obj("Job", "demo-0", 1, spec={"suspend": True}))
    clock.now = 61  # bounded: out-of-band edits are repaired
    assert not cache.unchanged(job)
    cache.applied(job)
    cache.saw_deleted(job)
    assert not cache.unchanged(job)


def test_a_job_is_not_rendered_again_until_its_inputs_change_a_child_goes_or_it_is_stale() -> None:
    clock = Clock()
    cache = cache_with({}, clock)
    job, report = obj("Job", "demo-0", 1), obj("ConfigMap", "demo-report", 2)
    assert not cache.children_current(KEY, "inputs-1")
    cache.applied(job)
    cache.rendered(KEY, "inputs-1", [job, report])  # the report never applied: not current
    assert not cache.children_current(KEY, "inputs-1")
    clock.now = 10
    cache.applied(report)
    cache.rendered(KEY, "inputs-1", [job, report])
    assert cache.children_current(KEY, "inputs-1")
    assert not cache.children_current(KEY, "inputs-2")  # e.g. a label or the attempt changed
    clock.now = 59  # stale by the oldest child's apply (at 0), not the newest's
    assert cache.children_current(KEY, "inputs-1")
    clock.now = 61
    assert not cache.children_current(KEY, "inputs-1")
    cache.applied(job)
    cache.rendered(KEY, "inputs-1", [job, report])  # report applied at 10: current till 70
    assert cache.children_current(KEY, "inputs-1")
    cache.saw_deleted(report)  # out of band: render and apply again
    assert not cache.children_current(KEY, "inputs-1")
    cache.applied(report)
    cache.rendered(KEY, "inputs-1", [job, report])
    cache.deleted("Job", "ns", "demo-0")  # by us
    assert not cache.children_current(KEY, "inputs-1")
    cache.applied(job)
    cache.rendered(KEY, "inputs-1", [job, report])
    cache.forget(KEY)
    assert not cache.children_current(KEY, "inputs-1")


def test_pods_by_attempt_and_report_by_name() -> None:
    pods = {
        KEY: [
            obj("Pod", "demo-0-a", 3, labels={"lmforge.io/attempt": "0"}, spec={"big": 1}),
            obj("Pod", "demo-1-a", 4, labels={"lmforge.io/attempt": "1"}),
        ]
    }
    reports = {KEY: [obj("ConfigMap", "demo-report", 7, data={"progress": "{}"})]}
    cache = cache_with({"pods": pods, "reports": reports})
    assert [p["metadata"]["name"] for p in cache.pods(*KEY, attempt=1)] == ["demo-1-a"]
    assert cache.report(*KEY)["data"] == {"progress": "{}"}  # type: ignore[index]
    assert cache.job(*KEY) is None


def test_slim_drops_what_no_decision_reads() -> None:
    pod = slim(obj("Pod", "p", 1, spec={"containers": []}, status={"phase": "Running"}))
    assert "spec" not in pod and "managedFields" not in pod["metadata"]
    assert pod["status"] == {"phase": "Running"}
