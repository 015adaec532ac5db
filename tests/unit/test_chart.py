"""The Helm chart as rendered by Helm itself: lint, schema, optional monitoring objects,
least-privilege RBAC. Installing it into a cluster is tests/integration/test_chart.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmforge.operator.serving.render import ServingTarget
from lmforge.operator.serving.render import render_children as render_serving
from lmforge.operator.training.render import TrainingTarget, render_trainer_access
from lmforge.operator.training.render import render_children as render_training

from lmforge.api.kinds import FinetuneJob, InferenceService

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/lmforge"
MONITORING = ("ServiceMonitor", "PodMonitor", "PrometheusRule")

Obj = dict[str, Any]


def helm(tools: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tools / "helm"), *args], capture_output=True, text=True, timeout=120)


def render(tools: Path, *args: str) -> list[Obj]:
    proc = helm(tools, "template", "lmf", str(CHART), "--namespace", "lmforge-system", *args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def kinds(objects: list[Obj]) -> list[str]:
    return [o["kind"] for o in objects]


def the(objects: list[Obj], kind: str) -> Obj:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


@pytest.mark.parametrize("values", [[], ["--set", "watchNamespaces={team-a,team-b}"]])
def test_helm_lint(tools: Path, values: list[str]) -> None:
    proc = helm(tools, "lint", "--strict", str(CHART), *values)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_helm_reports_the_kubernetes_version_it_was_built_for(tools: Path, tmp_path: Path) -> None:
    """A plain `go install` would tell templates Kubernetes v1.20 (hack/build-tools.sh)."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "Chart.yaml").write_text("apiVersion: v2\nname: kv\nversion: 0.1.0\n")
    (tmp_path / "templates/kv.yaml").write_text("kube: {{ .Capabilities.KubeVersion }}\n")
    proc = helm(tools, "template", "kv", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    major, minor = yaml.safe_load(proc.stdout)["kube"].lstrip("v").split(".")[:2]
    assert (int(major), int(minor)) >= (1, 29), proc.stdout
    assert helm(tools, "version", "--short").stdout.startswith("v3.22.0")


def test_default_install_objects(tools: Path) -> None:
    objects = render(tools)
    assert sorted(kinds(objects)) == sorted(
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "ConfigMap",
        ]
    )
    deployment = the(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/lmforge/operator:0.1.0"
    assert "--trainer-image=ghcr.io/lmforge/trainer:0.1.0" in container["args"]
    assert "--inferencer-image=ghcr.io/lmforge/inferencer:0.1.0" in container["args"]
    assert not any(a.startswith("--namespace") for a in container["args"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Pod Security "restricted"
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["serviceAccountName"] == the(objects, "ServiceAccount")["metadata"]["name"]
    pdb = the(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_images_come_from_values(tools: Path) -> None:
    objects = render(
        tools,
        "--set",
        "image.operator.repository=registry.local/op,image.operator.tag=dev",
        "--set",
        "image.trainer.repository=registry.local/trainer,image.trainer.tag=cu124",
        "--set",
        "image.inferencer.repository=registry.local/vllm,image.inferencer.tag=cpu",
    )
    (container,) = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.local/op:dev"
    assert "--trainer-image=registry.local/trainer:cu124" in container["args"]
    assert "--inferencer-image=registry.local/vllm:cpu" in container["args"]
    # The operator parses what the chart passes.
    from lmforge.operator.main import parse_args

    args = parse_args([a for a in container["args"] if a.startswith("--")])
    assert args.inferencer_image == "registry.local/vllm:cpu"


def test_namespace_scoped_mode_has_no_cluster_rights(tools: Path) -> None:
    objects = render(tools, "--set", "watchNamespaces={team-a,team-b}")
    assert "ClusterRole" not in kinds(objects) and "ClusterRoleBinding" not in kinds(objects)
    roles = {
        (o["metadata"]["namespace"], o["metadata"]["name"]) for o in objects if o["kind"] == "Role"
    }
    assert roles == {
        ("team-a", "lmf-lmforge-operator"),
        ("team-b", "lmf-lmforge-operator"),
        ("lmforge-system", "lmf-lmforge-operator-leader-election"),
    }
    (container,) = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--namespace=team-a" in container["args"] and "--namespace=team-b" in container["args"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "replicas=0"], "replicas"),
        (["--set", "watchNamespaces={Not_A_Namespace}"], "watchNamespaces"),
        (["--set", "metrics.serviceMonitor.enabled=maybe"], "serviceMonitor"),
        (["--set", "operator.logFormat=xml"], "logFormat"),
        (["--set", "operatr.resyncSeconds=5"], "operatr"),
    ],
)
def test_schema_rejects_bad_values(tools: Path, values: list[str], message: str) -> None:
    proc = helm(tools, "template", "lmf", str(CHART), *values)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_monitoring_objects_only_when_the_cluster_has_them_or_asked(tools: Path) -> None:
    assert not set(MONITORING) & set(kinds(render(tools)))
    apis = [f"--api-versions=monitoring.coreos.com/v1/{k}" for k in MONITORING]
    assert set(MONITORING) <= set(kinds(render(tools, *apis)))
    asked = [f"--set=metrics.{k[0].lower() + k[1:]}.enabled=true" for k in MONITORING]
    assert set(MONITORING) <= set(kinds(render(tools, *asked)))
    refused = [f"--set=metrics.{k[0].lower() + k[1:]}.enabled=false" for k in MONITORING]
    assert not set(MONITORING) & set(kinds(render(tools, *apis, *refused)))


def test_pod_monitor_scrapes_the_ports_trainers_and_replicas_have(tools: Path) -> None:
    """Each PodMonitor endpoint names a port our pods really have, and both kinds of pod
    are covered: trainers (lmforge_train_*) and serving replicas (vllm:*, lmforge_serving_*)."""
    monitor = the(render(tools, "--set=metrics.podMonitor.enabled=true"), "PodMonitor")
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    job = FinetuneJob.model_validate(
        yaml.safe_load((ROOT / "examples/finetunejob-lora.yaml").read_text())
    )
    service = InferenceService.model_validate(
        yaml.safe_load((ROOT / "examples/inferenceservice.yaml").read_text())
    )
    uris = {"model": "pvc://models/base"}
    trainer = the(render_training(TrainingTarget(job, "ml", "uid", uris)).objects, "Job")
    replica = the(
        render_serving(ServingTarget(service, "ml", "uid", uris, ())).objects, "Deployment"
    )
    selector = monitor["spec"]["selector"]["matchExpressions"]
    for pod in (trainer["spec"]["template"], replica["spec"]["template"]):
        assert all(e["key"] in pod["metadata"]["labels"] for e in selector)
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert ports & set(endpoints), (ports, set(endpoints))
    (relabel,) = endpoints["http"]["relabelings"]
    assert relabel["targetLabel"] == "job_name"
    label = relabel["sourceLabels"][0].removeprefix("__meta_kubernetes_pod_label_")
    pod_labels = replica["spec"]["template"]["metadata"]["labels"]
    assert label in {k.replace(".", "_").replace("/", "_").replace("-", "_") for k in pod_labels}


def test_prometheus_rule_and_dashboard_are_the_tested_files(tools: Path) -> None:
    objects = render(tools, "--set=metrics.prometheusRule.enabled=true")
    rules = yaml.safe_load((CHART / "files/prometheus/alerts.yaml").read_text())
    assert the(objects, "PrometheusRule")["spec"] == rules
    dashboard = the(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["lmforge.json"]) == json.loads(
        (CHART / "files/dashboards/lmforge.json").read_text()
    )


def rule_grants(rules: list[Obj]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for r in rules
        for group in r["apiGroups"]
        for resource in r["resources"]
        for verb in r["verbs"]
    }


def test_rbac_is_enumerated_and_covers_what_the_operator_grants_trainers(tools: Path) -> None:
    objects = render(tools)
    rules = the(objects, "ClusterRole")["rules"]
    grants = rule_grants(rules)
    assert not any("*" in part for grant in grants for part in grant), "no wildcards"
    assert not any(r == "secrets" or r.startswith("pods/") for _, r, _ in grants)
    assert not any(r.get("nonResourceURLs") for r in rules)
    # RBAC forbids granting rights one does not hold: the trainer's Role must be covered.
    job = FinetuneJob.model_validate(
        yaml.safe_load((ROOT / "examples/finetunejob-tiny.yaml").read_text())
    )
    trainer_role = next(
        o
        for o in render_trainer_access(TrainingTarget(job, "ml", "uid", "", 0))
        if o["kind"] == "Role"
    )
    assert rule_grants(trainer_role["rules"]) <= grants
