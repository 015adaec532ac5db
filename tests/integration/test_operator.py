"""The operator on the real control plane: children, scheduling, status, failures, recovery."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge.api.runconfig import RunConfig
from tests.integration.conftest import (
    OperatorProcess,
    condition,
    events_of,
    status_of,
    wait_for,
)
from tests.kube import Kube

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
GPU_NODES = {"gpu-h100-0", "gpu-h100-1", "gpu-h100-2", "gpu-a10-0"}

JOB: dict[str, Any] = {
    "apiVersion": "lmforge.io/v1alpha1",
    "kind": "FinetuneJob",
    "metadata": {"name": "job"},
    "spec": {
        "model": {"source": "hf://org/base-model"},
        "dataset": {"sources": [{"uri": "hf://org/dataset"}]},
        "distributed": {"gpusPerNode": 1},
    },
}


def job(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(JOB)
    obj["metadata"] = {"name": name, "labels": labels or {}}
    obj["spec"].update(spec)
    return obj


def children(kube: Kube, ns: str, name: str) -> dict[str, list[str]]:
    selector = f"lmforge.io/job-name={name}"
    out = {}
    for kind in (
        "configmap",
        "persistentvolumeclaim",
        "service",
        "serviceaccount",
        "role",
        "rolebinding",
        "job",
    ):
        items = kube.get(kind, "-n", ns, "-l", selector)["items"]
        out[kind] = sorted(i["metadata"]["name"] for i in items)
    return out


def pods(kube: Kube, ns: str, name: str) -> list[dict[str, Any]]:
    return list(kube.get("pods", "-n", ns, "-l", f"lmforge.io/job-name={name}")["items"])


def phase(kube: Kube, ns: str, name: str) -> str | None:
    return status_of(kube, ns, name).get("phase")


@pytest.fixture(scope="module")
def prerequisites(crds: Kube) -> None:
    crds.apply(
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": "training-high"},
            "value": 1000,
        }
    )


def _claims(kube: Kube, ns: str, *names: str) -> None:
    kube.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": n, "namespace": ns},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }
            for n in names
        ]
    )


EXPECTED = {
    "finetunejob-lora.yaml": (
        "llama3-alpaca-lora",
        1,
        ["llama3-alpaca-lora-cache", "llama3-alpaca-lora-output"],
    ),
    "finetunejob-multinode.yaml": (
        "llama3-70b-full",
        2,
        ["llama3-70b-full-cache", "llama3-70b-full-output"],
    ),
    "finetunejob-qlora.yaml": ("qwen2-qlora", 1, ["qwen2-qlora-cache", "qwen2-qlora-output"]),
    "finetunejob-queued.yaml": ("mistral-cpt-legal", 1, []),
}


@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_examples_run_to_success(
    crds: Kube, operator: OperatorProcess, prerequisites: None, namespace: str, example: str
) -> None:
    name, nodes, claims = EXPECTED[example]
    _claims(crds, namespace, "datasets", "models", "research-outputs")
    applied = time.monotonic()
    crds.run("apply", "-n", namespace, "-f", str(ROOT / "examples" / example), check=True)
    wait_for(
        lambda: children(crds, namespace, name)["job"],
        "the training Job",
        timeout=30,
        interval=0.05,
    )
    latency = time.monotonic() - applied
    print(f"\n{example}: apply -> Job created in {latency:.2f}s")

    got = children(crds, namespace, name)
    assert got == {
        "configmap": sorted([f"{name}-report", f"{name}-run-config"]),
        "persistentvolumeclaim": claims,
        "service": [name],
        "serviceaccount": [f"{name}-trainer"],
        "role": [f"{name}-trainer"],
        "rolebinding": [f"{name}-trainer"],
        "job": [f"{name}-0"],
    }
    workload = crds.get("job", f"{name}-0", "-n", namespace)
    assert workload["spec"]["completions"] == workload["spec"]["parallelism"] == nodes
    assert workload["spec"]["completionMode"] == "Indexed"
    config_map = crds.get("configmap", f"{name}-run-config", "-n", namespace)
    config = RunConfig.model_validate(json.loads(config_map["data"]["run.json"]))
    assert config.name == name and config.namespace == namespace

    if example == "finetunejob-queued.yaml":
        # Without Kueue the workload waits, suspended, in its queue.
        assert workload["spec"]["suspend"] is True
        assert workload["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"
        wait_for(
            lambda: (
                condition(status_of(crds, namespace, name), "Reconciling")
                and status_of(crds, namespace, name)["conditions"]
            ),
            "queued status",
        )
        assert wait_for(
            lambda: (
                (c := condition(status_of(crds, namespace, name), "Reconciling"))
                and c["reason"] == "Queued"
                and c
            ),
            "reason Queued",
        )
        # Admission, as Kueue does it: unsuspend the Job. The operator must not fight it.
        crds.patch("job", f"{name}-0", namespace, {"spec": {"suspend": False}})

    proc = crds.run(
        "wait", "-n", namespace, "--for=condition=Succeeded", f"finetunejob/{name}", "--timeout=90s"
    )
    assert proc.returncode == 0, proc.stderr
    status = status_of(crds, namespace, name)
    assert status["phase"] == "Succeeded"
    assert status["output"]["uri"].startswith("pvc://") and status["output"]["uri"].endswith(
        "/final"
    )
    nodes_used = {p["spec"]["nodeName"] for p in pods(crds, namespace, name)}
    gpus = config.spec.distributed.gpus_per_node
    if gpus:
        assert nodes_used <= GPU_NODES
    assert len(nodes_used) == nodes  # one pod per node (8 GPUs fill an H100 node)


def _running(kube: Kube, ns: str, name: str) -> None:
    wait_for(lambda: phase(kube, ns, name) == "Running", f"{name} Running", timeout=60)


def test_three_failure_paths(crds: Kube, operator: OperatorProcess, namespace: str) -> None:
    run_policy = {"backoffLimit": 1}
    crds.apply(
        [
            job("oom", {"lmforge.io/kwok-fail": "oom"}, runPolicy=run_policy),
            job("bad-data", {"lmforge.io/kwok-fail": "bad-data"}, runPolicy=run_policy),
            job("evicted", {"lmforge.io/kwok-hold": "true"}, runPolicy=run_policy),
        ],
        "-n",
        namespace,
    )

    # 1. OOMKilled: retryable. All ranks restart as attempt 1; OOM again exhausts backoffLimit 1.
    wait_for(lambda: phase(crds, namespace, "oom") == "Failed", "oom Failed", timeout=90)
    status = status_of(crds, namespace, "oom")
    assert status["restarts"] == 1
    assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"
    assert "ran out of memory" in condition(status, "Failed")["message"]
    reasons = [e["reason"] for e in events_of(crds, namespace, "oom")]
    assert "OOMKilled" in reasons and "BackoffLimitExceeded" in reasons
    assert children(crds, namespace, "oom")["job"] == ["oom-1"]  # attempt 0 cleaned up

    # 2. Bad data: not retryable. Failed at once, no restart, the trainer's message shown.
    wait_for(lambda: phase(crds, namespace, "bad-data") == "Failed", "bad-data Failed")
    status = status_of(crds, namespace, "bad-data")
    assert status["restarts"] == 0
    failed = condition(status, "Failed")
    assert failed["reason"] == "BadData" and "train.jsonl:line 7" in failed["message"]
    assert "BadData" in [e["reason"] for e in events_of(crds, namespace, "bad-data")]

    # 3. Evicted: a disruption, not the job's fault. The pod is replaced in the same
    # attempt and does not count against backoffLimit.
    _running(crds, namespace, "evicted")
    (victim,) = pods(crds, namespace, "evicted")
    eviction = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": victim["metadata"]["name"], "namespace": namespace},
    }
    crds.run(
        "create",
        "--raw",
        f"/api/v1/namespaces/{namespace}/pods/{victim['metadata']['name']}/eviction",
        "-f",
        "-",
        input=json.dumps(eviction),
        check=True,
    )
    wait_for(
        lambda: [
            p
            for p in pods(crds, namespace, "evicted")
            if p["metadata"]["name"] != victim["metadata"]["name"]
            and p["status"].get("phase") == "Running"
        ],
        "a replacement pod",
    )
    disrupted = wait_for(
        lambda: condition(status_of(crds, namespace, "evicted"), "Disrupted"), "Disrupted condition"
    )
    assert disrupted["status"] == "True"
    _running(crds, namespace, "evicted")  # the replacement runs (status may lag a moment)
    assert status_of(crds, namespace, "evicted")["restarts"] == 0
    assert "Disrupted" in [e["reason"] for e in events_of(crds, namespace, "evicted")]
    assert children(crds, namespace, "evicted")["job"] == ["evicted-0"]


def test_nccl_timeout_restarts_from_checkpoint(
    crds: Kube, operator: OperatorProcess, namespace: str
) -> None:
    crds.apply(
        job("nccl", {"lmforge.io/kwok-fail": "nccl"}, runPolicy={"backoffLimit": 2}),
        "-n",
        namespace,
    )
    wait_for(lambda: phase(crds, namespace, "nccl") == "Failed", "nccl Failed", timeout=120)
    status = status_of(crds, namespace, "nccl")
    assert status["restarts"] == 2
    assert "rendezvous/NCCL timeout" in condition(status, "Failed")["message"]
    reasons = [e["reason"] for e in events_of(crds, namespace, "nccl")]
    assert reasons.count("RendezvousTimeout") == 2


def test_suspend_keeps_attempt_and_resumes(
    crds: Kube, operator: OperatorProcess, namespace: str
) -> None:
    crds.apply(job("pause", {"lmforge.io/kwok-hold": "true"}), "-n", namespace)
    _running(crds, namespace, "pause")
    crds.patch("ftj", "pause", namespace, {"spec": {"runPolicy": {"suspend": True}}})
    wait_for(lambda: phase(crds, namespace, "pause") == "Suspended", "Suspended")
    assert crds.get("job", "pause-0", "-n", namespace)["spec"]["suspend"] is True
    wait_for(
        lambda: (
            not [
                p
                for p in pods(crds, namespace, "pause")
                if not p["metadata"].get("deletionTimestamp")
            ]
        ),
        "pods stopped",
    )
    assert condition(status_of(crds, namespace, "pause"), "Suspended")["status"] == "True"

    crds.patch("ftj", "pause", namespace, {"spec": {"runPolicy": {"suspend": False}}})
    _running(crds, namespace, "pause")
    status = status_of(crds, namespace, "pause")
    assert status["restarts"] == 0 and children(crds, namespace, "pause")["job"] == ["pause-0"]


def test_deadline_and_ttl(crds: Kube, operator: OperatorProcess, namespace: str) -> None:
    crds.apply(
        [
            job("slow", {"lmforge.io/kwok-hold": "true"}, runPolicy={"activeDeadlineSeconds": 3}),
            job("short-lived", runPolicy={"ttlSecondsAfterFinished": 0}),
        ],
        "-n",
        namespace,
    )
    wait_for(lambda: phase(crds, namespace, "slow") == "Failed", "deadline", timeout=60)
    assert condition(status_of(crds, namespace, "slow"), "Failed")["reason"] == "DeadlineExceeded"

    wait_for(lambda: phase(crds, namespace, "short-lived") == "Succeeded", "short-lived done")
    wait_for(lambda: not children(crds, namespace, "short-lived")["job"], "Job removed by TTL")
    time.sleep(4)  # a resync or two later, the terminal state has not flapped
    assert phase(crds, namespace, "short-lived") == "Succeeded"
    assert children(crds, namespace, "short-lived")["job"] == []


def test_from_job_waits_for_the_model(
    crds: Kube, operator: OperatorProcess, namespace: str
) -> None:
    crds.apply(
        [
            job("base", {"lmforge.io/kwok-hold": "true"}),
            job("second", model={"fromJob": {"name": "base"}}),
        ],
        "-n",
        namespace,
    )
    waiting = wait_for(
        lambda: condition(status_of(crds, namespace, "second"), "Reconciling"), "second waiting"
    )
    assert waiting["reason"] == "WaitingForModel" and "FinetuneJob base" in waiting["message"]
    assert children(crds, namespace, "second")["job"] == []

    _running(crds, namespace, "base")
    (pod,) = pods(crds, namespace, "base")
    crds.run(
        "label",
        "pod",
        "-n",
        namespace,
        pod["metadata"]["name"],
        "lmforge.io/kwok-hold-",
        check=True,
    )  # KWOK lets it finish now
    crds.run(
        "wait",
        "-n",
        namespace,
        "--for=condition=Succeeded",
        "finetunejob/second",
        "--timeout=60s",
        check=True,
    )
    run = json.loads(
        crds.get("configmap", "second-run-config", "-n", namespace)["data"]["run.json"]
    )
    assert run["paths"]["model"] == "/mnt/pvc/base-output/finetunejob/base/final"
    volumes = crds.get("job", "second-0", "-n", namespace)["spec"]["template"]["spec"]["volumes"]
    assert {"claimName": "base-output", "readOnly": True} in [
        v.get("persistentVolumeClaim") for v in volumes
    ]


def test_pods_admitted_under_restricted_pod_security(
    crds: Kube, operator: OperatorProcess, namespace: str
) -> None:
    crds.run(
        "label",
        "namespace",
        namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
        check=True,
    )
    crds.apply(job("secure", distributed={"nodes": 2, "gpusPerNode": 1}), "-n", namespace)
    crds.run(
        "wait",
        "-n",
        namespace,
        "--for=condition=Succeeded",
        "finetunejob/secure",
        "--timeout=60s",
        check=True,
    )
    assert len(pods(crds, namespace, "secure")) == 2
    failed_creates = [
        e for e in crds.get("events", "-n", namespace)["items"] if e["reason"] == "FailedCreate"
    ]
    assert failed_creates == []


def test_progress_reaches_status_and_columns(
    crds: Kube, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    crds.apply(job("watched", {"lmforge.io/kwok-hold": "true"}), "-n", namespace)
    _running(crds, namespace, "watched")
    report = {
        "step": 30,
        "totalSteps": 120,
        "percent": 25,
        "loss": 1.5,
        "tokensPerSecond": 900.0,
        "etaSeconds": 300,
        "learningRate": 0.0002,
        "updatedAt": "2026-01-01T00:00:00Z",
    }
    checkpoint = {
        "step": 20,
        "path": "/mnt/output/finetunejob/watched/checkpoints/checkpoint-20",
        "time": "2026-01-01T00:00:00Z",
    }
    # Written the way the trainer writes them: with the job's own ServiceAccount token.
    trainer = crds.as_service_account(namespace, "watched-trainer", tmp_path)
    data = {"progress": json.dumps(report), "last-checkpoint": json.dumps(checkpoint)}
    trainer.patch("configmap", "watched-report", namespace, {"data": data})
    progress = wait_for(
        lambda: status_of(crds, namespace, "watched").get("progress"), "progress in status"
    )
    assert progress == report
    last = wait_for(
        lambda: status_of(crds, namespace, "watched").get("lastCheckpoint"),
        "lastCheckpoint in status",
    )
    assert last == {
        "step": 20,
        "time": "2026-01-01T00:00:00Z",
        "uri": "pvc://watched-output/finetunejob/watched/checkpoints/checkpoint-20",
    }
    _, row = crds.run("get", "ftj", "watched", "-n", namespace, check=True).stdout.splitlines()[:2]
    assert row.split()[1:4] == ["Running", "25", "1.5"]


def test_operator_metrics(crds: Kube, operator: OperatorProcess, namespace: str) -> None:
    crds.apply(job("counted"), "-n", namespace)
    crds.run(
        "wait",
        "-n",
        namespace,
        "--for=condition=Succeeded",
        "finetunejob/counted",
        "--timeout=60s",
        check=True,
    )
    text = wait_for(
        lambda: (
            (t := operator.metrics())
            and 'lmforge_jobs{kind="FinetuneJob",phase="Succeeded"}' in t
            and t
        ),
        "metrics",
    )
    for name in (
        "lmforge_reconcile_total",
        "lmforge_reconcile_duration_seconds_bucket",
        "lmforge_job_duration_seconds_count",
        "lmforge_gpu_hours_requested_total",
    ):
        assert name in text, name
    # The routine start (creating the Job, waiting for its pod) is in status only, no Event
    # (a burst of 1,000 jobs spent 7 % of its time on them); the job's Events say how it went.
    events = [e["message"] for e in events_of(crds, namespace, "counted")]
    assert not [m for m in events if m.startswith(("New -> ", "Pending -> "))], events
    assert [m for m in events if "-> Succeeded: output written to" in m], events


def test_second_replica_stands_by(crds: Kube, operator: OperatorProcess, tmp_path: Path) -> None:
    standby = OperatorProcess(crds, tmp_path, identity="pytest-standby")
    standby.start()
    try:
        time.sleep(6)
        # A standby is ready (to take over: a PodDisruptionBudget may evict one replica at
        # a time) but does not lead.
        standby.wait_ready()
        assert "lmforge_operator_leader 0.0" in standby.metrics()
        assert "lmforge_operator_leader 1.0" in operator.metrics()
        log = next(tmp_path.glob("operator-pytest-standby-*.log")).read_text()
        assert "standing by" in log
        lease = crds.get("lease", "lmforge-operator", "-n", "default")
        assert lease["spec"]["holderIdentity"] == operator.identity
    finally:
        standby.kill()


def test_example_yaml_unchanged_by_operator(
    crds: Kube, operator: OperatorProcess, namespace: str
) -> None:
    """GitOps: the operator writes only status; the applied spec and metadata stay as the
    user wrote them."""
    obj = yaml.safe_load((ROOT / "examples" / "finetunejob-lora.yaml").read_text())
    crds.apply(obj, "-n", namespace)
    crds.run(
        "wait",
        "-n",
        namespace,
        "--for=condition=Succeeded",
        "finetunejob/llama3-alpaca-lora",
        "--timeout=60s",
        check=True,
    )
    live = crds.get("ftj", "llama3-alpaca-lora", "-n", namespace)
    annotations = live["metadata"].get("annotations") or {}
    assert not [k for k in annotations if "kopf" in k]
    # no finalizer either: deleting a job never waits for the operator to be running
    assert not live["metadata"].get("finalizers"), live["metadata"]
    assert live["spec"] == obj["spec"]  # no defaults stored either: they are the operator's
    assert live["status"]["observedGeneration"] == live["metadata"]["generation"]


def _alignment(name: str, method: dict[str, Any], data_format: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "AlignmentJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"fromJob": {"name": "sft"}},
            "dataset": {"sources": [{"uri": "hf://org/prefs", "format": data_format}]},
            "method": method,
            "distributed": {"gpusPerNode": 1},
            **spec,
        },
    }


def test_alignment_chain_waits_for_every_model_it_references(
    crds: Kube, operator: OperatorProcess, namespace: str
) -> None:
    """SFT -> reward model -> GRPO: each AlignmentJob waits for the jobs whose outputs it
    uses (base model and reward model), then runs with them mounted where its run config
    says."""
    reward_ref = {"fromJob": {"kind": "AlignmentJob", "name": "rm"}}
    crds.apply(
        [
            job("sft", {"lmforge.io/kwok-hold": "true"}),
            _alignment("rm", {"type": "reward-model"}, "preference"),
            _alignment(
                "grpo",
                {"type": "grpo", "rewards": [{"model": reward_ref}]},
                "prompt",
                generation={"samplesPerPrompt": 4},
            ),
        ],
        "-n",
        namespace,
    )

    def waiting(name: str) -> dict[str, Any] | None:
        found = condition(status_of(crds, namespace, name, "alignmentjob"), "Reconciling")
        return found if found and found["reason"] == "WaitingForModel" else None

    message = wait_for(lambda: waiting("grpo"), "grpo waiting")["message"]
    assert "FinetuneJob sft (spec.model)" in message
    assert "AlignmentJob rm (spec.method.rewards[0].model)" in message
    assert "FinetuneJob sft" in wait_for(lambda: waiting("rm"), "rm waiting")["message"]
    assert children(crds, namespace, "grpo")["job"] == children(crds, namespace, "rm")["job"] == []

    _running(crds, namespace, "sft")
    (pod,) = pods(crds, namespace, "sft")
    crds.run("label", "pod", "-n", namespace, pod["metadata"]["name"], "lmforge.io/kwok-hold-")
    for name in ("rm", "grpo"):  # rm runs once sft is done, grpo once rm is done
        crds.run(
            "wait",
            "-n",
            namespace,
            "--for=condition=Succeeded",
            f"alignmentjob/{name}",
            "--timeout=90s",
            check=True,
        )
    rm_status = status_of(crds, namespace, "rm", "alignmentjob")
    assert rm_status["output"]["kind"] == "reward-model"
    run = RunConfig.model_validate(
        json.loads(crds.get("configmap", "grpo-run-config", "-n", namespace)["data"]["run.json"])
    )
    assert run.kind == "AlignmentJob" and run.spec.method.beta == 0.04  # type: ignore[union-attr]
    assert run.paths.model == "/mnt/pvc/sft-output/finetunejob/sft/final"
    assert run.model_path("method.rewards[0].model") == "/mnt/pvc/rm-output/alignmentjob/rm/final"
    volumes = crds.get("job", "grpo-0", "-n", namespace)["spec"]["template"]["spec"]["volumes"]
    claims = [v["persistentVolumeClaim"] for v in volumes if "persistentVolumeClaim" in v]
    assert {"claimName": "rm-output", "readOnly": True} in claims
    assert {"claimName": "sft-output", "readOnly": True} in claims


def test_trainer_token_may_write_its_report_and_nothing_else(
    crds: Kube, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    """Code in a training pod (trustRemoteCode models too) holds the job's ServiceAccount
    token: it may patch the job's report ConfigMap and must not touch other pods or
    objects."""
    crds.apply(
        [
            job("mine", {"lmforge.io/kwok-hold": "true"}),
            job("other", {"lmforge.io/kwok-hold": "true"}),
        ],
        "-n",
        namespace,
    )
    for name in ("mine", "other"):
        _running(crds, namespace, name)
    trainer = crds.as_service_account(namespace, "mine-trainer", tmp_path)
    allowed = trainer.patch(
        "configmap", "mine-report", namespace, {"data": {"x": "1"}}, check=False
    )
    assert allowed.returncode == 0, allowed.stderr
    (own_pod,) = pods(crds, namespace, "mine")
    (other_pod,) = pods(crds, namespace, "other")
    patch = {"metadata": {"labels": {"hijacked": "yes"}}}
    for target in (
        ("pod", other_pod["metadata"]["name"]),
        ("pod", own_pod["metadata"]["name"]),
        ("configmap", "other-report"),
        ("configmap", "mine-run-config"),
    ):
        refused = trainer.patch(*target, namespace, patch, check=False)
        assert refused.returncode != 0 and "forbidden" in refused.stderr.lower(), target
    assert "forbidden" in trainer.run("get", "secrets", "-n", namespace).stderr.lower()
    assert "hijacked" not in (
        crds.get("pod", other_pod["metadata"]["name"], "-n", namespace)["metadata"].get("labels")
        or {}
    )


def _wait_stalled(kube: Kube, ns: str, name: str, reason: str, says: str, timeout: float) -> None:
    seen: list[Any] = []

    def stalled() -> bool:
        seen.append(condition(status_of(kube, ns, name), "Stalled"))
        c = seen[-1] or {}
        return c.get("status") == "True" and c.get("reason") == reason and says in c["message"]

    try:
        wait_for(stalled, name, timeout=max(1.0, timeout))
    except AssertionError:
        raise AssertionError(f"{name}: not Stalled/{reason} saying {says!r}: {seen[-1]}") from None


def test_stuck_jobs_say_why_within_seconds(
    crds: Kube, operator: OperatorProcess, namespace: str
) -> None:
    """A missing input volume, GPUs no node has, a missing Secret: each shows up as a
    condition naming the cause, instead of pods pending in silence."""
    crds.apply(
        [
            job("no-volume", dataset={"sources": [{"uri": "pvc://data/train.jsonl"}]}),
            job("too-big", distributed={"gpusPerNode": 16}),
            job(
                "no-secret",
                {"lmforge.io/kwok-stuck": "missing-secret"},
                model={"source": "hf://org/base-model", "secretRef": {"name": "hf-token"}},
            ),
        ],
        "-n",
        namespace,
    )
    expected = {
        "no-volume": ("MissingVolume", 'PersistentVolumeClaim "data" not found'),
        "too-big": ("Unschedulable", "Insufficient nvidia.com/gpu"),
        "no-secret": ("MissingSecret", 'secret "hf-token" not found'),
    }
    started = time.monotonic()
    for name, (reason, says) in expected.items():
        # The condition follows the pods: the scheduler may first say the pod's new
        # claims are not bound yet (the provisioner is a moment behind), then the cause.
        _wait_stalled(crds, namespace, name, reason, says, 20 - (time.monotonic() - started))
    assert children(crds, namespace, "no-volume")["job"] == []  # nothing left pending
    # Creating the claim lets the job go on.
    _claims(crds, namespace, "data")
    wait_for(lambda: children(crds, namespace, "no-volume")["job"], "no-volume's Job")


ALIGNMENT_CHAINS = {
    # the examples an AlignmentJob example builds on, applied together
    "dpo": ["finetunejob-lora.yaml", "alignmentjob-dpo.yaml"],
    "grpo": ["alignmentjob-reward-model.yaml", "alignmentjob-grpo.yaml"],
}


@pytest.mark.parametrize("chain", sorted(ALIGNMENT_CHAINS))
def test_alignment_examples_run_to_success(
    crds: Kube, operator: OperatorProcess, prerequisites: None, namespace: str, chain: str
) -> None:
    _claims(crds, namespace, "datasets", "models", "research-outputs")
    files = ALIGNMENT_CHAINS[chain]
    for example in files:
        crds.run("apply", "-n", namespace, "-f", str(ROOT / "examples" / example), check=True)
    for example in files:
        obj = yaml.safe_load((ROOT / "examples" / example).read_text())
        kind, name = obj["kind"].lower(), obj["metadata"]["name"]
        crds.run(
            "wait",
            "-n",
            namespace,
            "--for=condition=Succeeded",
            f"{kind}/{name}",
            "--timeout=120s",
            check=True,
        )
        assert status_of(crds, namespace, name, kind)["output"]["uri"].endswith("/final")
