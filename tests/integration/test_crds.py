"""The CRDs on a real kube-apiserver: install, examples, invalid catalogue, status, printing."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import pytest

from tests.catalogue import BASE, CASES, Case
from tests.kube import Kube

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def ns(crds: Kube) -> str:
    name = f"crd-{uuid.uuid4().hex[:6]}"
    crds.run("create", "namespace", name, check=True)
    return name


def test_crds_established(crds: Kube) -> None:
    for plural in ("finetunejobs", "alignmentjobs", "inferenceservices"):
        crd = crds.get("crd", f"{plural}.lmforge.io")
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", conditions
        assert conditions.get("NamesAccepted") == "True", conditions
    listed = crds.run("get", "crd", check=True).stdout
    assert listed.count(".lmforge.io") == 3
    # The category lists all three kinds at once.
    assert crds.run("get", "lmforge", "-A", check=True).returncode == 0


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_accepted_by_server(crds: Kube, ns: str, path: Path) -> None:
    proc = crds.run("apply", "--dry-run=server", "-n", ns, "-f", str(path))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue_rejected_by_server(crds: Kube, ns: str, case: Case) -> None:
    proc = crds.server_dry_run(case.build(), ns)
    assert proc.returncode != 0, f"{case.id} was accepted"
    assert case.field in proc.stderr, proc.stderr


def test_valid_bases_accepted(crds: Kube, ns: str) -> None:
    """The catalogue's base objects themselves are valid, so each case fails for its change."""
    for obj in BASE.values():
        proc = crds.server_dry_run(obj, ns)
        assert proc.returncode == 0, proc.stderr


def test_server_stores_the_job_as_written(crds: Kube, ns: str) -> None:
    """No server-side defaults: the stored spec is what was applied (the operator applies
    the models' defaults when it renders), `kubectl explain` names each default, and the
    rules read an absent field as its default (gpusPerNode 1 lets ZeRO run 2 nodes)."""
    obj = copy.deepcopy(BASE["FinetuneJob"]) | {"metadata": {"name": "as-written"}}
    obj["spec"]["distributed"] = {"nodes": 2, "strategy": "zero3"}
    crds.apply(obj, "-n", ns)
    assert crds.get("finetunejob", "as-written", "-n", ns)["spec"] == obj["spec"]
    crds.apply(obj, "-n", ns)  # applying it again is no change
    explained = " ".join(crds.run("explain", "finetunejob.spec.method", check=True).stdout.split())
    assert 'Default: "lora"' in explained
    no_gpus = copy.deepcopy(obj) | {"metadata": {"name": "zero-no-gpus"}}
    no_gpus["spec"]["distributed"]["gpusPerNode"] = 0
    proc = crds.server_dry_run(no_gpus, ns)
    assert proc.returncode != 0 and "spec.distributed" in proc.stderr, proc.stderr


def test_status_only_through_subresource(crds: Kube, ns: str) -> None:
    obj = copy.deepcopy(BASE["FinetuneJob"])
    obj["metadata"] = {"name": "status-sub"}
    obj["status"] = {"phase": "Succeeded"}
    crds.run("create", "-n", ns, "-f", "-", input=json.dumps(obj), check=True)
    assert (
        "status" not in crds.get("finetunejob", "status-sub", "-n", ns)
        or "phase" not in crds.get("finetunejob", "status-sub", "-n", ns)["status"]
    )

    running = {"status": {"phase": "Running"}}
    crds.patch("finetunejob", "status-sub", ns, running)  # the main resource ignores status
    assert crds.get("finetunejob", "status-sub", "-n", ns).get("status", {}).get("phase") is None

    crds.patch("finetunejob", "status-sub", ns, running, subresource="status")
    assert crds.get("finetunejob", "status-sub", "-n", ns)["status"]["phase"] == "Running"

    bad = {"status": {"phase": "Exploded"}}
    proc = crds.patch("finetunejob", "status-sub", ns, bad, subresource="status", check=False)
    assert proc.returncode != 0 and "status.phase" in proc.stderr


def test_spec_fields_immutable_after_create(crds: Kube, ns: str) -> None:
    obj = copy.deepcopy(BASE["FinetuneJob"]) | {"metadata": {"name": "immutable"}}
    crds.apply(obj, "-n", ns)
    for change in (
        {"method": {"type": "full"}},
        {"image": "ghcr.io/me/trainer:1"},
        {"resources": {"requests": {"cpu": "4"}}},
        {"scheduling": {"priorityClassName": "urgent"}},
    ):
        proc = crds.patch("finetunejob", "immutable", ns, {"spec": change}, check=False)
        field = next(iter(change))
        assert proc.returncode != 0 and f"spec.{field}" in proc.stderr, proc.stderr
        assert "immutable" in proc.stderr
    # Run policy stays mutable: suspending a job is an intended change.
    crds.patch("finetunejob", "immutable", ns, {"spec": {"runPolicy": {"suspend": True}}})


def test_printer_columns_and_short_names(crds: Kube, ns: str) -> None:
    obj = copy.deepcopy(BASE["FinetuneJob"]) | {"metadata": {"name": "printed"}}
    crds.apply(obj, "-n", ns)
    status = {
        "status": {
            "phase": "Running",
            "progress": {"step": 50, "totalSteps": 200, "percent": 25, "loss": 1.234},
        }
    }
    crds.patch("ftj", "printed", ns, status, subresource="status")
    out = crds.run("get", "ftj", "printed", "-n", ns, check=True).stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "AGE"]
    assert row.split()[:4] == ["printed", "Running", "25", "1.234"]


def test_explain_shows_descriptions(crds: Kube) -> None:
    out = crds.run("explain", "finetunejob.spec.method", check=True).stdout
    assert "Which parameters are trained" in out
    assert "quantization" in out and "Base-weight quantization; required for qlora." in out
