"""The Helm chart installed into the local control plane, and the operator running with
the chart's ServiceAccount: its RBAC is enough (the examples succeed) and no more (a
`kubectl auth can-i` table). KWOK plays the kubelet, so the Deployment's pods are
simulated; the operator itself runs out of cluster with the ServiceAccount's token."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import OperatorProcess, condition, status_of, wait_for
from tests.integration.test_operator import _claims, prerequisites  # noqa: F401
from tests.kube import Kube

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/lmforge"
RELEASE, SYSTEM = "lmf", "lmforge-system"
SA = "lmf-lmforge-operator"
# Every example that runs on the cluster (the DPO and GRPO chains build on the others).
EXAMPLES = [
    "finetunejob-lora.yaml",
    "finetunejob-multinode.yaml",
    "finetunejob-qlora.yaml",
    "finetunejob-queued.yaml",
    "alignmentjob-dpo.yaml",
    "alignmentjob-reward-model.yaml",
    "alignmentjob-grpo.yaml",
]


def kind_and_name(example: str) -> tuple[str, str]:
    obj = yaml.safe_load((ROOT / "examples" / example).read_text())
    return obj["kind"].lower(), obj["metadata"]["name"]


class Helm:
    def __init__(self, binary: Path, kube: Kube) -> None:
        self.binary, self.kube = binary, kube

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.binary), f"--kubeconfig={self.kube.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
        return proc


@pytest.fixture(scope="module")
def helm(tools: Path, crds: Kube) -> Iterator[Helm]:
    h = Helm(tools / "helm", crds)
    yield h
    h("uninstall", RELEASE, "-n", SYSTEM, "--wait", check=False)


@pytest.fixture(scope="module")
def installed(helm: Helm, crds: Kube) -> Kube:
    helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        SYSTEM,
        "--create-namespace",
        "--wait",
        "--timeout=120s",
    )
    return crds


def test_install_makes_the_operator_available(installed: Kube) -> None:
    deployment = installed.get("deployment", "lmf-lmforge-operator", "-n", SYSTEM)
    available = next(c for c in deployment["status"]["conditions"] if c["type"] == "Available")
    assert available["status"] == "True"
    assert deployment["status"]["readyReplicas"] == 2
    pods = installed.get("pods", "-n", SYSTEM, "-l", "app.kubernetes.io/component=operator")
    assert {p["spec"]["serviceAccountName"] for p in pods["items"]} == {SA}
    pdb = installed.get("pdb", "lmf-lmforge-operator", "-n", SYSTEM)
    assert wait_for(
        lambda: (
            installed.get("pdb", "lmf-lmforge-operator", "-n", SYSTEM)["status"].get(
                "disruptionsAllowed"
            )
            == 1
        ),
        "PDB allows one eviction",
    )
    assert pdb["spec"]["minAvailable"] == 1


def service_account_kubeconfig(kube: Kube, path: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount (a bound token)."""
    token = kube.run(
        "create", "token", SA, "-n", SYSTEM, "--duration=1h", check=True
    ).stdout.strip()
    admin = json.loads(
        kube.run("config", "view", "--raw", "--minify", "-o", "json", check=True).stdout
    )
    cluster = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": SA, "user": {"token": token}}],
        "contexts": [{"name": SA, "context": {"cluster": cluster["name"], "user": SA}}],
        "current-context": SA,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_operator_as_the_service_account_runs_the_examples(
    installed: Kube,
    prerequisites: None,  # noqa: F811
    namespace: str,
    tmp_path: Path,
) -> None:
    kubeconfig = service_account_kubeconfig(installed, tmp_path / "operator-sa.kubeconfig")
    sa_kube = Kube(installed.kubectl_bin, kubeconfig)
    assert sa_kube.run("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout == (
        f"system:serviceaccount:{SYSTEM}:{SA}"
    )
    operator = OperatorProcess(
        sa_kube, tmp_path, identity="chart-sa", kubeconfig=kubeconfig, lease_namespace=SYSTEM
    )
    operator.start()
    try:
        operator.wait_ready()
        _claims(installed, namespace, "datasets", "models", "research-outputs")
        for example in EXAMPLES:
            installed.run(
                "apply", "-n", namespace, "-f", str(ROOT / "examples" / example), check=True
            )
        # Admission, as Kueue does it, once the operator reports the job Queued.
        _, queued = kind_and_name("finetunejob-queued.yaml")
        wait_for(
            lambda: (
                (c := condition(status_of(installed, namespace, queued), "Reconciling"))
                and c["reason"] == "Queued"
            ),
            "reason Queued",
        )

        def admit() -> bool:
            # Level-triggered, as Kueue's job controller: unsuspend until the job moves on
            # (a reconcile that read the Job before the patch may apply suspend again).
            installed.patch("job", f"{queued}-0", namespace, {"spec": {"suspend": False}})
            time.sleep(1)
            return status_of(installed, namespace, queued).get("phase") != "Pending"

        wait_for(admit, "the queued job admitted", timeout=60, interval=1)
        for example in EXAMPLES:
            kind, name = kind_and_name(example)
            proc = installed.run(
                "wait",
                "-n",
                namespace,
                "--for=condition=Succeeded",
                f"{kind}/{name}",
                "--timeout=180s",
                timeout=200,
            )
            assert proc.returncode == 0, (name, status_of(installed, namespace, name, kind))
        assert "lmforge_operator_leader 1.0" in operator.metrics()
        lease = installed.get("lease", "lmforge-operator", "-n", SYSTEM)
        assert lease["spec"]["holderIdentity"] == "chart-sa"
    finally:
        operator.kill()
    log = "".join(p.read_text() for p in tmp_path.glob("operator-chart-sa-*.log"))
    assert "forbidden" not in log.lower(), log[-3000:]


SUBRESOURCES = {"status", "exec", "token", "log", "finalizers", "eviction"}


def can_i(kube: Kube, verb: str, resource: str, namespace: str | None) -> bool:
    """`resource` is TYPE, TYPE/NAME or TYPE/SUBRESOURCE (status, exec, token, ...)."""
    scope = ["-n", namespace] if namespace else []
    kind, _, rest = resource.partition("/")
    target = [kind, f"--subresource={rest}"] if rest in SUBRESOURCES else [resource]
    proc = kube.run(
        "auth", "can-i", verb, *target, *scope, f"--as=system:serviceaccount:{SYSTEM}:{SA}"
    )
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


# (verb, resource, namespace: "job" = a users' namespace, SYSTEM, or None = cluster scope)
MUST = [
    ("watch", "finetunejobs.lmforge.io", "job"),
    ("patch", "finetunejobs.lmforge.io/status", "job"),
    ("update", "finetunejobs.lmforge.io/finalizers", "job"),
    ("get", "alignmentjobs.lmforge.io", "job"),
    ("create", "jobs.batch", "job"),
    ("delete", "jobs.batch", "job"),
    ("list", "pods", "job"),
    ("patch", "configmaps", "job"),
    ("get", "configmaps", "job"),
    ("watch", "configmaps", "job"),
    ("get", "persistentvolumeclaims", "job"),
    ("create", "persistentvolumeclaims", "job"),
    ("create", "rolebindings.rbac.authorization.k8s.io", "job"),
    ("create", "events", "job"),
    ("patch", "deployments.apps", "job"),  # InferenceService replicas
    ("watch", "deployments.apps", "job"),
    ("delete", "horizontalpodautoscalers.autoscaling", "job"),
    ("create", "leases.coordination.k8s.io", SYSTEM),
    ("update", "leases.coordination.k8s.io/lmforge-operator", SYSTEM),
]
MUST_NOT = [
    ("get", "secrets", "job"),
    ("list", "secrets", "job"),
    ("get", "secrets", SYSTEM),
    ("create", "pods/exec", "job"),
    ("get", "pods/log", "job"),
    ("create", "pods/eviction", "job"),
    ("update", "finetunejobs.lmforge.io/status", "job"),
    ("create", "pods", "job"),
    ("delete", "pods", "job"),
    ("create", "finetunejobs.lmforge.io", "job"),
    ("delete", "finetunejobs.lmforge.io", "job"),
    ("patch", "inferenceservices.lmforge.io", "job"),  # only their status is written
    ("patch", "pods", "job"),
    ("update", "pods", "job"),
    ("delete", "configmaps", "job"),
    ("delete", "persistentvolumeclaims", "job"),
    ("delete", "deployments.apps", "job"),
    ("patch", "statefulsets.apps", "job"),
    ("update", "leases.coordination.k8s.io/kube-scheduler", SYSTEM),
    ("create", "leases.coordination.k8s.io", "job"),
    ("escalate", "roles.rbac.authorization.k8s.io", "job"),
    ("bind", "clusterroles.rbac.authorization.k8s.io", None),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
    ("list", "nodes", None),
    ("list", "namespaces", None),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("impersonate", "serviceaccounts", "job"),
    ("create", "serviceaccounts/token", "job"),
]


def test_rbac_can_i_table(installed: Kube, namespace: str) -> None:
    def where(ns: str | None) -> str | None:
        return namespace if ns == "job" else ns

    wrong = [(v, r, ns, "must") for v, r, ns in MUST if not can_i(installed, v, r, where(ns))]
    wrong += [(v, r, ns, "must not") for v, r, ns in MUST_NOT if can_i(installed, v, r, where(ns))]
    assert wrong == []


def test_upgrade_to_namespace_scoped_then_uninstall_keeps_crds_and_jobs(
    helm: Helm, installed: Kube, namespace: str, tmp_path: Path
) -> None:
    other = f"{namespace}-other"
    installed.run("create", "namespace", other, check=True)
    try:
        helm(
            "upgrade",
            RELEASE,
            str(CHART),
            "-n",
            SYSTEM,
            "--wait",
            "--timeout=120s",
            "--set",
            f"watchNamespaces={{{namespace}}}",
        )
        assert installed.run("get", "clusterrole", "lmf-lmforge-operator").returncode != 0
        assert can_i(installed, "create", "jobs.batch", namespace)
        assert not can_i(installed, "create", "jobs.batch", other)
        assert not can_i(installed, "list", "pods", other)
        args = installed.get("deployment", "lmf-lmforge-operator", "-n", SYSTEM)["spec"][
            "template"
        ]["spec"]["containers"][0]["args"]
        assert f"--namespace={namespace}" in args

        installed.apply(
            yaml.safe_load((ROOT / "examples/finetunejob-tiny.yaml").read_text())
            | {"metadata": {"name": "kept", "namespace": namespace}}
        )
        helm("uninstall", RELEASE, "-n", SYSTEM, "--wait")
        assert (
            installed.run("get", "deployment", "lmf-lmforge-operator", "-n", SYSTEM).returncode != 0
        )
        assert installed.run("get", "serviceaccount", SA, "-n", SYSTEM).returncode != 0
        for crd in ("finetunejobs", "alignmentjobs", "inferenceservices"):
            assert installed.run("get", "crd", f"{crd}.lmforge.io").returncode == 0
        assert installed.get("finetunejob", "kept", "-n", namespace)["metadata"]["name"] == "kept"
    finally:
        installed.run("delete", "namespace", other, "--wait=false")


def test_readme_argocd_snippet_adds_the_health_checks(installed: Kube) -> None:
    """The README's command patches argocd-cm with the chart's health.lua files."""
    readme = (ROOT / "README.md").read_text()
    (snippet,) = [
        block
        for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
        if "resource.customizations.health" in block
    ]
    installed.run("create", "namespace", "argocd")
    installed.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "argocd-cm", "namespace": "argocd"},
            "data": {"url": "https://argocd.example"},
        }
    )
    env = {
        **os.environ,
        "PATH": f"{installed.kubectl_bin.parent}:{os.environ['PATH']}",
        "KUBECONFIG": str(installed.kubeconfig),
    }
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", snippet],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    data = installed.get("configmap", "argocd-cm", "-n", "argocd")["data"]
    lua = ROOT / "charts/lmforge/files/argocd"
    assert data["url"] == "https://argocd.example"  # merged, not replaced
    for kind, script in (
        ("FinetuneJob", "training-job-health.lua"),
        ("AlignmentJob", "training-job-health.lua"),
        ("InferenceService", "inferenceservice-health.lua"),
    ):
        assert (
            data[f"resource.customizations.health.lmforge.io_{kind}"] == (lua / script).read_text()
        )


MONITORING = ("ServiceMonitor", "PodMonitor", "PrometheusRule")


def test_monitoring_objects_pass_the_prometheus_operator_schemas(
    tools: Path, helm: Helm, crds: Kube, namespace: str
) -> None:
    """The chart's ServiceMonitor, PodMonitor and PrometheusRule against the CRDs of
    prometheus-operator (its Go module): the API server's strict validation accepts them."""
    files = sorted((tools / "prometheus-operator-crds").glob("*.yaml"))
    assert len(files) == len(MONITORING), files
    names = [yaml.safe_load(f.read_text())["metadata"]["name"] for f in files]
    try:
        for path in files:  # server-side: these CRDs are too big for the last-applied annotation
            crds.run("apply", "--server-side", "-f", str(path), check=True)
        crds.run("wait", "--for=condition=Established", *(f"crd/{n}" for n in names), check=True)
        flags = [f"--set=metrics.{k[0].lower() + k[1:]}.enabled=true" for k in MONITORING]
        rendered = helm("template", RELEASE, str(CHART), "-n", namespace, *flags).stdout
        objects = [o for o in yaml.safe_load_all(rendered) if o and o["kind"] in MONITORING]
        assert sorted(o["kind"] for o in objects) == sorted(MONITORING)
        for obj in objects:
            proc = crds.server_dry_run(obj, namespace)
            assert proc.returncode == 0, (obj["kind"], proc.stderr)
        # The check can fail: a misspelt field is refused.
        monitor = next(o for o in objects if o["kind"] == "PodMonitor")
        endpoint = monitor["spec"]["podMetricsEndpoints"][-1]
        endpoint["relabellings"] = endpoint.pop("relabelings")
        proc = crds.server_dry_run(monitor, namespace)
        assert proc.returncode != 0 and "relabellings" in proc.stderr, proc.stderr
    finally:
        crds.run("delete", "crd", *names, "--ignore-not-found", "--wait=false")
