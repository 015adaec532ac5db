"""The operator serving an InferenceService on the real control plane (KWOK plays the nodes).

KWOK pods run no process, so the test plays the replica's part of the contract: it writes
what `lmforge serve` reports (`ReplicaState.wire()`) into the report ConfigMap, as the
replica's own ServiceAccount (impersonated), which proves the narrow rights too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from lmforge.serve.supervisor import AdapterState, ReplicaState
from tests.integration.conftest import OperatorProcess, condition, status_of, wait_for
from tests.integration.custom_metrics import CustomMetricsAPI
from tests.kube import Kube

pytestmark = pytest.mark.cluster


def finetune_job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": name, "labels": {"lmforge.io/kwok-hold": "true"}},
        "spec": {
            "model": {"source": "hf://org/base-model"},
            "dataset": {"sources": [{"uri": "hf://org/dataset"}]},
            "distributed": {"gpusPerNode": 1},
        },
    }


def inference_service(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {"model": {"source": "hf://org/base-model"}, "gpusPerReplica": 1, **spec},
    }


def service_status(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    return status_of(kube, ns, name, "inferenceservice")


def adapter_state(kube: Kube, ns: str, name: str, adapter: str) -> dict[str, Any]:
    for entry in service_status(kube, ns, name).get("adapters") or []:
        if entry["name"] == adapter:
            return dict(entry)
    return {}


def replica_sets(kube: Kube, ns: str, name: str) -> list[dict[str, Any]]:
    items = kube.get("replicasets", "-n", ns, "-l", f"lmforge.io/job-name={name}")["items"]
    return list(items)


def test_adapter_from_a_running_job_loads_when_it_succeeds_without_a_rollout(
    crds: Kube, operator: OperatorProcess, namespace: str
) -> None:
    adapters = [{"name": "alpaca", "fromJob": {"name": "ft"}}]
    crds.apply([finetune_job("ft"), inference_service("chat", adapters=adapters)], "-n", namespace)
    pending = wait_for(
        lambda: (
            adapter_state(crds, namespace, "chat", "alpaca").get("state") == "Pending"
            and adapter_state(crds, namespace, "chat", "alpaca")
        ),
        "adapter Pending",
    )
    assert "FinetuneJob ft" in pending["message"]
    wait_for(lambda: service_status(crds, namespace, "chat").get("readyReplicas") == 1, "ready")
    template = crds.get("deployment", "chat", "-n", namespace)["spec"]["template"]
    (replica_set,) = replica_sets(crds, namespace, "chat")
    desired = crds.get("configmap", "chat-adapters", "-n", namespace)["data"]["adapters.json"]
    assert json.loads(desired)["adapters"] == []

    # The training job finishes: its adapter enters the desired set, the pods stay.
    (pod,) = crds.get("pods", "-n", namespace, "-l", "lmforge.io/job-name=ft")["items"]
    crds.run("label", "pod", "-n", namespace, pod["metadata"]["name"], "lmforge.io/kwok-hold-")
    crds.run(
        "wait",
        "-n",
        namespace,
        "--for=condition=Succeeded",
        "finetunejob/ft",
        "--timeout=60s",
        check=True,
    )
    uri = status_of(crds, namespace, "ft")["output"]["uri"]

    def desired_paths() -> list[str]:
        cm = crds.get("configmap", "chat-adapters", "-n", namespace)
        return [a["path"] for a in json.loads(cm["data"]["adapters.json"])["adapters"]]

    (path,) = wait_for(desired_paths, "adapter in the desired set")
    assert path == "/mnt/pvc/" + uri.removeprefix("pvc://")
    loading = wait_for(
        lambda: (
            adapter_state(crds, namespace, "chat", "alpaca").get("state") == "Loading"
            and adapter_state(crds, namespace, "chat", "alpaca")
        ),
        "adapter Loading (resolved, not reported yet)",
    )
    assert loading["uri"] == uri

    # The replica reports it loaded, with its ServiceAccount's rights.
    (replica,) = crds.get("pods", "-n", namespace, "-l", "lmforge.io/job-name=chat")["items"]
    state = ReplicaState(model="chat", model_loaded=True, model_message="")
    state.adapters["alpaca"] = AdapterState("Loaded", path)
    account = f"system:serviceaccount:{namespace}:chat-inferencer"
    report = {"data": {replica["metadata"]["name"]: json.dumps(state.wire())}}
    patch = ("patch", "configmap", "-n", namespace, "--type=merge", "-p", json.dumps(report))
    crds.run(*patch[:2], "chat-adapter-state", *patch[2:], f"--as={account}", check=True)
    denied = crds.run(*patch[:2], "chat-adapters", *patch[2:], f"--as={account}")
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    loaded = wait_for(
        lambda: (
            adapter_state(crds, namespace, "chat", "alpaca").get("state") == "Loaded"
            and adapter_state(crds, namespace, "chat", "alpaca")
        ),
        "adapter Loaded",
    )
    assert loaded["loadedReplicas"] == 1
    status = service_status(crds, namespace, "chat")
    assert condition(status, "AdaptersLoaded")["status"] == "True"  # type: ignore[index]
    ready = condition(status, "Ready")
    deployment = crds.get("deployment", "chat", "-n", namespace)
    pod_now = crds.get("pod", replica["metadata"]["name"], "-n", namespace)
    assert ready["status"] == "True", (  # type: ignore[index]
        ready,
        deployment.get("status"),
        pod_now["status"].get("conditions"),
    )
    assert status["phase"] == "Ready" and status["url"].endswith(":8000/v1")
    assert status["observedGeneration"] == 1

    # No replica was restarted: same pod template, same ReplicaSet, same pod.
    assert crds.get("deployment", "chat", "-n", namespace)["spec"]["template"] == template
    assert [r["metadata"]["name"] for r in replica_sets(crds, namespace, "chat")] == [
        replica_set["metadata"]["name"]
    ]
    (same,) = crds.get("pods", "-n", namespace, "-l", "lmforge.io/job-name=chat")["items"]
    assert same["metadata"]["uid"] == replica["metadata"]["uid"]


def test_autoscaling_renders_an_hpa_and_switching_it_off_removes_it(
    crds: Kube, operator: OperatorProcess, namespace: str
) -> None:
    scaling = {"minReplicas": 1, "maxReplicas": 3, "metric": "concurrency", "target": 8}
    crds.apply(inference_service("scaled", autoscaling=scaling), "-n", namespace)
    hpa = wait_for(
        lambda: (
            crds.run("get", "hpa", "scaled", "-n", namespace, "-o", "json").returncode == 0
            and crds.get("hpa", "scaled", "-n", namespace)
        ),
        "HPA created",
    )
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "scaled",
    }
    assert hpa["spec"]["maxReplicas"] == 3
    crds.patch(
        "inferenceservice", "scaled", namespace, {"spec": {"autoscaling": None, "replicas": 2}}
    )
    wait_for(
        lambda: crds.run("get", "hpa", "scaled", "-n", namespace).returncode != 0, "HPA deleted"
    )
    wait_for(
        lambda: crds.get("deployment", "scaled", "-n", namespace)["spec"]["replicas"] == 2,
        "Deployment at 2 replicas",
    )


@pytest.fixture
def custom_metrics(
    crds: Kube, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CustomMetricsAPI]:
    api = CustomMetricsAPI(crds, tmp_path_factory.mktemp("custom-metrics"))
    api.start()
    yield api
    api.stop()


def test_autoscaling_follows_the_load_per_replica(
    crds: Kube, operator: OperatorProcess, namespace: str, custom_metrics: CustomMetricsAPI
) -> None:
    """The HPA the operator renders scales the Deployment on requests running + waiting per
    replica as the cluster's custom metrics API reports them: up to ceil(load / target),
    capped at maxReplicas, and back down; the InferenceService's status follows."""
    target, metric = 5, "lmforge_serving_load"  # the name the README tells adapters to serve
    scaling = {"minReplicas": 1, "maxReplicas": 4, "metric": "concurrency", "target": target}
    body = inference_service("busy", autoscaling=scaling)
    # Only the metric name the renderer uses has values: an HPA asking for any other gets
    # a 404 and never scales.
    custom_metrics.set_load(namespace, metric, 0)
    crds.apply(body, "-n", namespace)

    def child(kind: str) -> dict[str, Any]:
        """The operator's child, {} until it has created it."""
        got = crds.run("get", kind, "busy", "-n", namespace, "-o", "json")
        return dict(json.loads(got.stdout)) if got.returncode == 0 else {}

    def hpa_status() -> dict[str, Any]:
        return dict(child("hpa").get("status") or {})

    def scaled_to(replicas: int) -> dict[str, Any] | bool:
        hpa = hpa_status()
        deployment = child("deployment")
        status = service_status(crds, namespace, "busy")
        return (
            hpa.get("desiredReplicas") == replicas
            and (deployment.get("spec") or {}).get("replicas") == replicas
            and (deployment.get("status") or {}).get("readyReplicas") == replicas
            and status.get("replicas") == replicas
            and status.get("readyReplicas") == replicas
            and status
        )

    def wait_scaled(replicas: int, what: str) -> dict[str, Any]:
        try:
            return dict(wait_for(lambda: scaled_to(replicas), what, timeout=90))
        except AssertionError as err:
            asked = {(r.metric, r.label_selector) for r in custom_metrics.requests_for(namespace)}
            conditions = [
                (c["type"], c["reason"], c["message"]) for c in hpa_status().get("conditions", [])
            ]
            raise AssertionError(f"{err}\nHPA: {conditions}\nmetrics asked: {asked}") from None

    wait_scaled(1, "1 replica, the HPA's floor, without load")

    # 15 requests in flight on one replica: 3x the target -> 3 replicas at 5 each.
    custom_metrics.set_load(namespace, metric, 3 * target)
    status = wait_scaled(3, "3 replicas at 3x the target")
    ready = condition(status, "Ready")
    assert ready is not None and ready["status"] == "True", ready
    assert ready["message"] == "3 of 3 replicas ready"
    (current,) = wait_for(
        lambda: [
            m
            for m in hpa_status().get("currentMetrics") or []
            if m["pods"]["current"]["averageValue"] == str(target)
        ],
        "the HPA seeing the target per replica",
    )
    assert current["pods"]["metric"]["name"] == metric
    active = condition(hpa_status(), "ScalingActive")
    assert active is not None and active["status"] == "True", active

    # 100 in flight would want 20 replicas: maxReplicas caps it at 4.
    custom_metrics.set_load(namespace, metric, 100)
    wait_scaled(4, "4 replicas (maxReplicas) at 20x the target")

    # The load falls to 4 (one per replica, under the target): back to a single replica.
    custom_metrics.set_load(namespace, metric, 4)
    status = wait_scaled(1, "back to 1 replica at low load")
    assert status["phase"] == "Ready"

    # Every question the HPA asked was for our metric of exactly this Deployment's pods.
    labels = crds.get("deployment", "busy", "-n", namespace)["spec"]["selector"]["matchLabels"]
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    asked = custom_metrics.requests_for(namespace)
    assert asked
    assert {(r.metric, ",".join(sorted(r.label_selector.split(",")))) for r in asked} == {
        (metric, selector)
    }


def test_switching_to_autoscaling_keeps_the_running_replicas(
    crds: Kube, operator: OperatorProcess, namespace: str, custom_metrics: CustomMetricsAPI
) -> None:
    """A service at 3 fixed replicas switched to autoscaling, under a load that wants 3,
    keeps its 3 replicas: none is dropped on the way (each would cost a cold model load
    to bring back)."""
    metric, target = "lmforge_serving_load", 5
    custom_metrics.set_load(namespace, metric, 3 * target)
    crds.apply(inference_service("steady", replicas=3), "-n", namespace)
    wait_for(
        lambda: service_status(crds, namespace, "steady").get("readyReplicas") == 3,
        "3 fixed replicas ready",
    )

    def replicas() -> dict[str, str]:
        pods = crds.get("pods", "-n", namespace, "-l", "lmforge.io/job-name=steady")["items"]
        return {
            p["metadata"]["name"]: p["metadata"]["uid"]
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
        }

    before = replicas()
    assert len(before) == 3
    scaling = {"minReplicas": 1, "maxReplicas": 4, "metric": "concurrency", "target": target}
    crds.patch(
        "inferenceservice",
        "steady",
        namespace,
        {"spec": {"replicas": None, "autoscaling": scaling}},
    )

    def hpa_settled() -> bool:
        got = crds.run("get", "hpa", "steady", "-n", namespace, "-o", "json")
        status = json.loads(got.stdout).get("status") or {} if got.returncode == 0 else {}
        active = condition(status, "ScalingActive")
        return bool(active and active["status"] == "True" and status.get("desiredReplicas") == 3)

    wait_for(hpa_settled, "the HPA acting on the load (3 replicas wanted)", timeout=90)
    assert crds.get("deployment", "steady", "-n", namespace)["spec"]["replicas"] == 3
    assert replicas() == before
