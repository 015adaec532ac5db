"""Argo CD health checks (charts/lmforge/files/argocd/*.lua) under gopher-lua, the engine
Argo CD embeds (hack/luahealth opens the same libraries Argo CD does).

Training statuses come from the operator's own `decide`, one per phase and reason, so
the scripts read what the operator really writes; serving statuses are fixtures.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml
from lmforge.operator.training.lifecycle import decide, set_condition

from tests.unit.test_lifecycle import COMPLETE, FAILED, T1, observed, pod, workload

ROOT = Path(__file__).resolve().parents[2]
ARGOCD = ROOT / "charts/lmforge/files/argocd"
FIXTURES = ROOT / "tests/fixtures/argocd"

Obj = dict[str, Any]


def health(tools: Path, script: str, objects: list[Obj]) -> list[Obj]:
    """Run one health script over many objects, as Argo CD would."""
    proc = subprocess.run(
        [str(tools / "luahealth"), str(ARGOCD / script)],
        input="".join(json.dumps(o) + "\n" for o in objects),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in proc.stdout.splitlines()]


def finetunejob(status: Obj | None, generation: int = 1) -> Obj:
    obj: Obj = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": "llama3-70b-full", "namespace": "ml", "generation": generation},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    return obj


def running_pods(n: int) -> list[Obj]:
    return [pod(i, phase="Running") for i in range(n)]


def crashed_pod() -> Obj:
    return pod(0, exit_code=1, message="segfault")


def unschedulable_pod() -> Obj:
    scheduled = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/6 nodes are available: 6 Insufficient nvidia.com/gpu.",
    }
    return pod(0, phase="Pending", conditions=[scheduled])


def bad_data_pod() -> Obj:
    return pod(0, exit_code=3, message='{"reason": "BadData", "message": "row 7: no text"}')


# (case, observation for decide, expected Argo CD health, text the message must contain)
TRAINING_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("created", {}, "Progressing", "creating the training workload"),
    ("suspended", {"suspend": True}, "Suspended", "runPolicy.suspend"),
    (
        "queued",
        {"queued": True, "workload": workload(suspend=True)},
        "Progressing",
        "Kueue",
    ),
    (
        "initializing",
        {"workload": workload(), "pods": running_pods(1)},
        "Progressing",
        "1 of 2 pods running",
    ),
    ("running", {"workload": workload(), "pods": running_pods(2)}, "Progressing", "Running"),
    (
        "restarting",
        {"workload": workload(FAILED), "pods": [crashed_pod()]},
        "Progressing",
        "restart 1 of 3",
    ),
    ("succeeded", {"workload": workload(COMPLETE)}, "Healthy", "output written"),
    ("failed", {"workload": workload(FAILED), "pods": [bad_data_pod()]}, "Degraded", "row 7"),
    (
        "waiting-for-model",
        {"dependencies": {"FinetuneJob base (spec.model)": None}},
        "Progressing",
        "waiting for FinetuneJob base",
    ),
    (
        "model-job-failed",
        {"dependencies": {"FinetuneJob base (spec.model)": {"status": {"phase": "Failed"}}}},
        "Degraded",
        "no model to train",
    ),
    # Stuck, with a reason the user can act on: Stalled, so Degraded although not terminal.
    (
        "missing-volume",
        {"missing_volumes": ['PersistentVolumeClaim "data" not found']},
        "Degraded",
        'PersistentVolumeClaim "data" not found',
    ),
    (
        "unschedulable",
        {"workload": workload(parallelism=1), "pods": [unschedulable_pod()]},
        "Degraded",
        "Insufficient nvidia.com/gpu",
    ),
]


def status_after(changes: dict[str, Any]) -> Obj:
    """The status the operator writes for this observation."""
    return dict(decide(observed(**changes)).status)


def test_training_health_for_every_phase(tools: Path) -> None:
    statuses = [status_after(changes) for _, changes, _, _ in TRAINING_CASES]
    phases = {s["phase"] for s in statuses}
    assert phases == {"Pending", "Initializing", "Running", "Succeeded", "Failed", "Suspended"}
    results = health(tools, "training-job-health.lua", [finetunejob(s) for s in statuses])
    for (case, _, expected, text), result in zip(TRAINING_CASES, results, strict=True):
        assert result.get("status") == expected, (case, result)
        assert text in result["message"], (case, result)


def test_training_terminal_phases_never_flap(tools: Path) -> None:
    """A finished job keeps its health whatever happens later: a spec edit (generation
    ahead of observedGeneration), a stale Stalled/Restarting condition."""
    done = status_after({"workload": workload(COMPLETE)})
    failed = status_after({"workload": workload(FAILED), "pods": [bad_data_pod()]})
    objects = [finetunejob(done), finetunejob(done, generation=5), finetunejob(failed, 5)]
    noisy = copy.deepcopy(done)
    noisy["conditions"] = set_condition(
        noisy["conditions"], "Restarting", True, "Crashed", "old restart", 1, T1
    )
    objects.append(finetunejob(noisy))
    got = [r["status"] for r in health(tools, "training-job-health.lua", objects)]
    assert got == ["Healthy", "Healthy", "Degraded", "Healthy"]


def test_training_health_edge_cases(tools: Path) -> None:
    running = status_after({"workload": workload(), "pods": running_pods(2)})
    stalled = copy.deepcopy(running) | {"phase": "Initializing"}
    stalled["conditions"] = set_condition(
        stalled["conditions"], "Stalled", True, "MissingVolume", 'PVC "data" not found', 1, T1
    )
    objects = [
        finetunejob(None),  # the operator has not seen it yet
        finetunejob(running, generation=2),  # edited, not yet observed
        finetunejob(stalled),  # a non-terminal job that cannot go on
        finetunejob({"phase": "Exploded"}),
    ]
    got = health(tools, "training-job-health.lua", objects)
    assert [r["status"] for r in got] == ["Progressing", "Progressing", "Degraded", "Unknown"]
    assert "generation 2" in got[1]["message"]
    assert 'PVC "data" not found' in got[2]["message"]


def test_inferenceservice_health_for_every_phase(tools: Path) -> None:
    cases = yaml.safe_load((FIXTURES / "inferenceservice.yaml").read_text())
    results = health(tools, "inferenceservice-health.lua", [c["object"] for c in cases])
    phases = {(c["object"].get("status") or {}).get("phase") for c in cases}
    assert {"Pending", "Loading", "Ready", "Degraded", "Failed"} <= phases
    for case, result in zip(cases, results, strict=True):
        assert result.get("status") == case["health"], (case["name"], result)
        assert case["message"] in result["message"], (case["name"], result)


def test_harness_opens_only_argocd_libraries(tools: Path, tmp_path: Path) -> None:
    """A script using the string library (which Argo CD does not open) fails here too."""
    broken = tmp_path / "broken.lua"
    broken.write_text('return {status = string.upper("healthy")}')
    proc = subprocess.run(
        [str(tools / "luahealth"), str(broken)],
        input=json.dumps(finetunejob(None)) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert "string" in json.loads(proc.stdout)["error"]
