"""The operator's watches against a real API server: what they hold, what they report,
and a listing again (after a watch's resourceVersion is too old) reporting exactly what
changed meanwhile."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kubernetes import client, config
from lmforge.operator.cache import owner_key
from lmforge.operator.kube import Kube as OperatorKube
from lmforge.operator.watches import Watch

from tests.integration.conftest import wait_for
from tests.kube import Kube

pytestmark = pytest.mark.cluster
JOB = "FinetuneJob"


def config_map(namespace: str, name: str, job: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"lmforge.io/job-kind": JOB, "lmforge.io/job-name": job},
        },
        "data": data,
    }


@pytest.fixture
def api(crds: Kube) -> OperatorKube:
    configuration = client.Configuration()
    config.load_kube_config(str(crds.kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
    return OperatorKube(client.ApiClient(configuration))


def recording_watch(
    api: OperatorKube, namespace: str, selector: str
) -> tuple[Watch, list[tuple[str, str]]]:
    """A watch of ConfigMaps grouped by job, and the (event, name) list it reports into."""
    events: list[tuple[str, str]] = []
    watch = Watch(
        api,
        "ConfigMap",
        namespace,
        group=owner_key,
        on_event=lambda t, o: events.append((t, o["metadata"]["name"])),
        selector=selector,
    )
    return watch, events


def test_a_watch_holds_slim_objects_by_job_and_reports_changes(
    api: OperatorKube, namespace: str
) -> None:
    watch, events = recording_watch(api, namespace, "lmforge.io/job-kind,lmforge.io/job-name")
    api.apply(config_map(namespace, "a-report", "a", step="1"), field_manager="test")
    stop = threading.Event()
    watch.start(stop)
    try:
        assert watch.synced.wait(30)
        assert events == [("ADDED", "a-report")]
        held = watch.get((JOB, namespace, "a"))
        assert [o["data"] for o in held] == [{"step": "1"}]
        assert held[0]["kind"] == "ConfigMap" and "managedFields" not in held[0]["metadata"]
        api.apply(config_map(namespace, "a-report", "a", step="2"), field_manager="test")
        api.apply(config_map(namespace, "b-report", "b"), field_manager="test")
        api.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/configmaps",
            body={"metadata": {"name": "unlabelled"}},
        )  # not selected: never seen
        wait_for(lambda: len(events) >= 3, "the watch reports both changes")
        assert events[1:] == [("MODIFIED", "a-report"), ("ADDED", "b-report")]
        assert watch.get((JOB, namespace, "a"))[0]["data"] == {"step": "2"}
        api.delete("ConfigMap", namespace, "a-report")
        wait_for(lambda: len(events) >= 4, "the deletion is reported")
        assert events[3] == ("DELETED", "a-report")
        assert watch.get((JOB, namespace, "a")) == [] and list(watch) == [(JOB, namespace, "b")]
    finally:
        stop.set()


def test_listing_again_reports_only_what_changed_meanwhile(
    api: OperatorKube, namespace: str
) -> None:
    watch, events = recording_watch(api, namespace, "lmforge.io/job-kind")
    for name in ("kept", "changed", "deleted"):
        api.apply(config_map(namespace, name, name), field_manager="test")
    watch._list()  # what a watch does first and after 410 Gone
    assert sorted(events) == [("ADDED", "changed"), ("ADDED", "deleted"), ("ADDED", "kept")]
    events.clear()
    # meanwhile, with no watch running: one changed, one deleted, one added
    api.apply(config_map(namespace, "changed", "changed", x="1"), field_manager="test")
    api.delete("ConfigMap", namespace, "deleted")
    api.apply(config_map(namespace, "added", "added"), field_manager="test")
    time.sleep(0.5)
    watch._list()
    assert sorted(events) == [("ADDED", "added"), ("DELETED", "deleted"), ("MODIFIED", "changed")]
    assert sorted(k[2] for k in watch) == ["added", "changed", "kept"]
