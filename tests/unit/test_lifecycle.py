"""Lifecycle decisions: from what the cluster shows to a job's status and next step.

Pod and Job dicts are shaped like the API server returns them (only the fields
the decisions read are filled in); no cluster is involved.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from lmforge.operator.training.lifecycle import (
    Action,
    Decision,
    Failure,
    Observed,
    classify_pod_failure,
    decide,
    set_condition,
)

from lmforge.api.kinds import TrainingJobStatus
from lmforge.api.runconfig import (
    EXIT_BAD_CONFIG,
    EXIT_BAD_DATA,
    EXIT_OUT_OF_MEMORY,
    REPORT_CHECKPOINT,
    REPORT_PROGRESS,
)

Obj = dict[str, Any]

JOB = "llama3-70b-full"
OUTPUT_URI = f"pvc://{JOB}-output/finetunejob/{JOB}/final"
T0, T1, T2 = "2025-01-01T00:00:00Z", "2025-01-01T01:00:00Z", "2025-01-01T02:00:00Z"


# ---------------------------------------------------------------- cluster objects


def pod(
    index: int = 0,
    *,
    phase: str = "Failed",
    exit_code: int | None = None,
    reason: str = "Error",
    message: str | None = None,
    finished_at: str = T1,
    conditions: list[Obj] | None = None,
    status_reason: str | None = None,
    init_failure: Obj | None = None,
    annotations: dict[str, str] | None = None,
) -> Obj:
    """A pod of attempt 0 of the job, with the trainer container in the given state."""
    if exit_code is not None:
        terminated: Obj = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": T0,
            "finishedAt": finished_at,
        }
        if message is not None:
            terminated["message"] = message
        state: Obj = {"terminated": terminated}
    elif phase == "Running":
        state = {"running": {"startedAt": T0}}
    else:
        state = {"waiting": {"reason": "PodInitializing"}}
    status: Obj = {
        "phase": phase,
        "conditions": conditions or [],
        "containerStatuses": [{"name": "trainer", "state": state, "restartCount": 0}],
    }
    if status_reason:
        status["reason"] = status_reason
    if init_failure is not None:
        status["initContainerStatuses"] = [
            {"name": "fetch-0", "state": {"terminated": init_failure}, "restartCount": 0}
        ]
    return {
        "metadata": {
            "name": f"{JOB}-0-{index}-x7k2p",
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}
            | (annotations or {}),
        },
        "status": status,
    }


def workload(*conditions: Obj, parallelism: int = 2, suspend: bool = False) -> Obj:
    """The batch/v1 Job of attempt 0."""
    return {
        "metadata": {"name": f"{JOB}-0", "labels": {"lmforge.io/attempt": "0"}},
        "spec": {"parallelism": parallelism, "completions": parallelism, "suspend": suspend},
        "status": {"conditions": list(conditions)},
    }


def job_condition(type_: str, reason: str = "", message: str = "") -> Obj:
    return {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": T1,
    }


COMPLETE = job_condition(
    "Complete", "CompletionsReached", "Reached expected number of succeeded pods"
)
FAILED = job_condition(
    "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"
)


def observed(**changes: Any) -> Observed:
    values: Obj = {
        "generation": 1,
        "status": {},
        "backoff_limit": 3,
        "suspend": False,
        "queued": False,
        "output_uri": OUTPUT_URI,
        "output_kind": "full",
        "now": T1,
    }
    return Observed(**(values | changes))


def condition(status: Obj, type_: str) -> Obj:
    (cond,) = [c for c in status.get("conditions", []) if c["type"] == type_]
    found: Obj = cond
    return found


def is_true(status: Obj, type_: str) -> bool:
    return bool(condition(status, type_)["status"] == "True")


def assert_valid_status(decision: Decision) -> None:
    """What decide writes must pass the CRD's status schema."""
    TrainingJobStatus.model_validate(decision.status)


# ---------------------------------------------------------------- classifying failed pods


OOM_BY_KERNEL = pod(exit_code=137, reason="OOMKilled")
EVICTED = pod(
    exit_code=143,
    conditions=[
        {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "EvictionByEvictionAPI",
            "message": "Eviction API: evicting",
        }
    ],
)
PREEMPTED = pod(
    exit_code=137,
    conditions=[
        {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "PreemptionByScheduler",
            "message": "Preempted in order to admit critical pod",
        }
    ],
)
BAD_DATA = pod(
    exit_code=EXIT_BAD_DATA,
    message=json.dumps(
        {"reason": "BadData", "message": "train.jsonl line 17: 'messages' is missing"}
    ),
)
BAD_CONFIG = pod(
    exit_code=EXIT_BAD_CONFIG,
    message=json.dumps({"reason": "InvalidMethod", "message": "qlora needs a GPU"}),
)
NCCL_TIMEOUT = pod(
    exit_code=1,
    message=(
        "[rank3]:[E ProcessGroupNCCL.cpp:616] [Rank 3] Watchdog caught collective operation "
        "timeout: WorkNCCL(SeqNum=4121, OpType=ALLREDUCE, NumelIn=262144) ran for 600000 "
        "milliseconds before timing out."
    ),
)
CRASH = pod(exit_code=1, message="Traceback (most recent call last):\nKeyError: 'lm_head'")


@pytest.mark.parametrize(
    ("failed_pod", "expected", "retryable", "explained_by"),
    [
        pytest.param(OOM_BY_KERNEL, Failure.OUT_OF_MEMORY, True, "OOMKilled", id="oom-killed"),
        pytest.param(
            pod(
                exit_code=EXIT_OUT_OF_MEMORY,
                message=json.dumps(
                    {"reason": "OutOfMemory", "message": "CUDA out of memory: tried 2 GiB"}
                ),
            ),
            Failure.OUT_OF_MEMORY,
            True,
            "CUDA out of memory",
            id="cuda-oom",
        ),
        pytest.param(EVICTED, Failure.DISRUPTED, True, "EvictionByEvictionAPI", id="evicted"),
        pytest.param(PREEMPTED, Failure.DISRUPTED, True, "PreemptionByScheduler", id="preempted"),
        pytest.param(
            pod(status_reason="Evicted", exit_code=137),
            Failure.DISRUPTED,
            True,
            "Evicted",
            id="node-pressure-eviction",
        ),
        pytest.param(
            BAD_DATA,
            Failure.BAD_DATA,
            False,
            "train.jsonl line 17: 'messages' is missing",
            id="bad-data",
        ),
        pytest.param(BAD_CONFIG, Failure.BAD_CONFIG, False, "qlora needs a GPU", id="bad-config"),
        pytest.param(
            NCCL_TIMEOUT, Failure.RENDEZVOUS_TIMEOUT, True, "Watchdog caught", id="nccl-watchdog"
        ),
        pytest.param(CRASH, Failure.CRASHED, True, "Traceback", id="crash"),
    ],
)
def test_classify_pod_failure(
    failed_pod: Obj, expected: Failure, retryable: bool, explained_by: str
) -> None:
    failure, explanation = classify_pod_failure(failed_pod)
    assert failure is expected
    assert failure.retryable is retryable
    assert explained_by in explanation
    assert failed_pod["metadata"]["name"] in explanation
    assert "\n" not in explanation  # one line, for a condition message and an event


def test_termination_message_json_is_unwrapped() -> None:
    _, explanation = classify_pod_failure(BAD_DATA)
    assert '"reason"' not in explanation and "{" not in explanation


def test_a_disruption_condition_that_is_not_true_is_no_disruption() -> None:
    crashed = copy.deepcopy(CRASH)
    crashed["status"]["conditions"] = [
        {"type": "DisruptionTarget", "status": "False", "reason": "EvictionByEvictionAPI"}
    ]
    assert classify_pod_failure(crashed)[0] is Failure.CRASHED


def test_bad_data_reported_through_torchrun_is_still_bad_data() -> None:
    # The worker wrote the termination message; torchrun itself exits 1 (ChildFailedError).
    through_torchrun = pod(
        exit_code=1,
        message=json.dumps({"reason": "BadData", "message": "train.jsonl line 17: no text"}),
    )
    failure, _ = classify_pod_failure(through_torchrun)
    assert failure is Failure.BAD_DATA


def test_failed_fetch_init_container_is_explained() -> None:
    fetch_failed = pod(
        init_failure={
            "exitCode": 1,
            "reason": "Error",
            "message": "401 Unauthorized: hf://meta-llama/Llama-3.1-70B (check secretRef)",
            "finishedAt": T1,
        }
    )
    _, explanation = classify_pod_failure(fetch_failed)
    assert "401 Unauthorized" in explanation
    assert "None" not in explanation


# ---------------------------------------------------------------- decide: creating


@pytest.mark.parametrize(
    ("suspend", "phase"), [(False, "Pending"), (True, "Suspended")], ids=["run", "suspend"]
)
def test_without_a_workload_the_children_are_applied(suspend: bool, phase: str) -> None:
    decision = decide(observed(suspend=suspend))
    assert decision.action is Action.APPLY
    assert decision.status["phase"] == phase
    assert decision.status["observedGeneration"] == 1
    assert decision.status["restarts"] == 0
    assert is_true(decision.status, "Suspended") is suspend
    assert is_true(decision.status, "Ready") is False
    # the routine start is in status only; suspending is an Event
    assert [e[0] for e in decision.events] == (["Normal"] if suspend else [])
    assert_valid_status(decision)


def test_the_routine_start_is_quiet_and_running_is_an_event() -> None:
    """Creating the workload and waiting for its pods are no Events (a burst of jobs would
    pay an Event each for them); the first Event of a job that starts says it runs."""
    created = decide(observed(workload=workload(), pods=[pod(0, phase="Pending")]))
    assert created.status["phase"] == "Initializing"
    assert created.events == []
    running = [pod(0, phase="Running"), pod(1, phase="Running")]
    started = decide(observed(status=created.status, workload=workload(), pods=running))
    assert started.events == [
        ("Normal", "Training", "Initializing -> Running: 2 of 2 pods running")
    ]


def test_a_workload_waiting_for_kueue_is_pending_queued() -> None:
    decision = decide(
        observed(status={"phase": "Pending"}, queued=True, workload=workload(suspend=True))
    )
    assert decision.status["phase"] == "Pending"
    assert condition(decision.status, "Reconciling")["reason"] == "Queued"
    assert decision.action is Action.APPLY


# ---------------------------------------------------------------- decide: running


def test_running_pods_report_progress_into_status() -> None:
    progress = {"step": 120, "totalSteps": 2000, "percent": 6, "loss": 1.73, "etaSeconds": 3600}
    pods = [pod(0, phase="Running"), pod(1, phase="Running")]
    report = {REPORT_PROGRESS: json.dumps(progress)}
    decision = decide(
        observed(status={"phase": "Initializing"}, workload=workload(), pods=pods, report=report)
    )
    assert decision.status["phase"] == "Running"
    assert decision.status["progress"] == progress
    assert decision.status["startTime"] == T1
    assert decision.action is Action.APPLY
    assert_valid_status(decision)


def test_reported_checkpoint_becomes_a_pvc_uri_in_status() -> None:
    pods = [pod(0, phase="Running")]
    checkpoint = {"step": 40, "path": "/mnt/output/ftj/x/checkpoints/checkpoint-40", "time": T1}
    decision = decide(
        observed(
            workload=workload(),
            pods=pods,
            report={REPORT_CHECKPOINT: json.dumps(checkpoint), REPORT_PROGRESS: "not json"},
            output_claim="x-output",
            output_mount="/mnt/output",
        )
    )
    assert decision.status["lastCheckpoint"] == {
        "step": 40,
        "uri": "pvc://x-output/ftj/x/checkpoints/checkpoint-40",
        "time": T1,
    }
    assert "progress" not in decision.status  # a garbled report is ignored, not fatal


UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/6 nodes are available: 6 Insufficient nvidia.com/gpu.",
}


def _waiting(reason: str, message: str) -> Obj:
    stuck = pod(0, phase="Pending")
    stuck["status"]["containerStatuses"][0]["state"] = {
        "waiting": {"reason": reason, "message": message}
    }
    return stuck


@pytest.mark.parametrize(
    ("stuck", "reason", "says"),
    [
        (pod(0, phase="Pending", conditions=[UNSCHEDULABLE]), "Unschedulable", "6 Insufficient"),
        (
            _waiting("CreateContainerConfigError", 'secret "hf-token" not found'),
            "MissingSecret",
            'secret "hf-token" not found',
        ),
        (_waiting("ImagePullBackOff", 'Back-off pulling "x"'), "ImagePullFailed", "Back-off"),
    ],
    ids=["unschedulable", "missing-secret", "image-pull"],
)
def test_pods_that_cannot_start_say_why(stuck: Obj, reason: str, says: str) -> None:
    decision = decide(observed(status={"phase": "Initializing"}, workload=workload(), pods=[stuck]))
    assert decision.status["phase"] == "Initializing"
    for type_ in ("Reconciling", "Stalled"):
        found = condition(decision.status, type_)
        assert found["status"] == "True" and found["reason"] == reason and says in found["message"]
    # a Warning Event says it once, however often the job is reconciled while stuck
    [(type_, event_reason, message)] = decision.events
    assert (type_, event_reason) == ("Warning", reason) and says in message
    again = decide(observed(status=decision.status, workload=workload(), pods=[stuck]))
    assert again.events == []
    # once the pod runs, Stalled clears
    running = [pod(0, phase="Running"), pod(1, phase="Running")]
    later = decide(observed(status=decision.status, workload=workload(), pods=running))
    assert later.status["phase"] == "Running"
    assert condition(later.status, "Stalled")["status"] == "False"


def test_missing_volume_is_said_before_any_pod_exists() -> None:
    decision = decide(observed(missing_volumes=['PersistentVolumeClaim "data" not found']))
    assert decision.status["phase"] == "Pending"
    assert decision.action is Action.NONE  # nothing is created that could only pend
    stalled = condition(decision.status, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "MissingVolume"
    assert '"data" not found' in stalled["message"]
    assert [e[:2] for e in decision.events] == [("Warning", "MissingVolume")]
    assert decide(observed(status=decision.status, missing_volumes=["x"])).events == []
    fixed = decide(observed(status=decision.status))
    assert fixed.action is Action.APPLY
    assert condition(fixed.status, "Stalled")["status"] == "False"


def test_not_all_ranks_running_is_initializing() -> None:
    pods = [pod(0, phase="Running"), pod(1, phase="Pending")]
    decision = decide(observed(status={"phase": "Pending"}, workload=workload(), pods=pods))
    assert decision.status["phase"] == "Initializing"
    assert "startTime" not in decision.status


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    pods = [pod(0, phase="Running"), pod(1, phase="Running")]
    first = decide(observed(workload=workload(), pods=pods, now=T0))
    assert first.status["phase"] == "Running"
    assert condition(first.status, "Reconciling")["lastTransitionTime"] == T0

    again = decide(observed(status=first.status, workload=workload(), pods=pods, now=T1))
    assert again.status["conditions"] == first.status["conditions"]
    assert again.events == []  # no phase change, no event

    done = decide(observed(status=again.status, workload=workload(COMPLETE), pods=[], now=T2))
    reconciling = condition(done.status, "Reconciling")
    assert reconciling["status"] == "False"
    assert reconciling["lastTransitionTime"] == T2
    assert condition(done.status, "Suspended")["lastTransitionTime"] == T0  # still False


@pytest.mark.parametrize(
    ("old", "new", "expected_time"),
    [
        pytest.param(None, True, T2, id="new-condition"),
        pytest.param("True", True, T0, id="unchanged"),
        pytest.param("False", True, T2, id="flipped"),
    ],
)
def test_set_condition_moves_transition_time_only_on_change(
    old: str | None, new: bool, expected_time: str
) -> None:
    existing = [
        {"type": "Ready", "status": "False", "reason": "R", "lastTransitionTime": T0},
    ]
    if old is not None:
        existing.append(
            {"type": "Training", "status": old, "reason": "Old", "lastTransitionTime": T0}
        )
    out = set_condition(existing, "Training", new, "New", "message", 4, T2)
    (cond,) = [c for c in out if c["type"] == "Training"]
    assert cond == {
        "type": "Training",
        "status": "True",
        "reason": "New",
        "message": "message",
        "lastTransitionTime": expected_time,
        "observedGeneration": 4,
    }
    assert [c for c in out if c["type"] == "Ready"] == existing[:1]  # others untouched
    assert len(out) == 2


# ---------------------------------------------------------------- decide: succeeding


def test_complete_workload_succeeds_with_output_and_final_metrics() -> None:
    summary = {"metrics": {"train_loss": 0.91, "eval_loss": 1.02, "tokens_per_second": 5120}}
    pods = [
        pod(0, phase="Succeeded", exit_code=0, reason="Completed", message=json.dumps(summary)),
        pod(1, phase="Succeeded", exit_code=0, reason="Completed"),
    ]
    previous = {"phase": "Running", "progress": {"step": 1990, "totalSteps": 2000, "percent": 99}}
    decision = decide(observed(status=previous, workload=workload(COMPLETE), pods=pods, now=T2))
    status = decision.status
    assert status["phase"] == "Succeeded"
    assert status["output"] == {"uri": OUTPUT_URI, "kind": "full"}
    assert status["metrics"] == {"train_loss": 0.91, "eval_loss": 1.02, "tokens_per_second": 5120.0}
    assert status["progress"]["step"] == 2000 and status["progress"]["percent"] == 100
    assert status["completionTime"] == T1  # when the Job completed, not when we noticed
    assert is_true(status, "Ready") and is_true(status, "Succeeded")
    assert not is_true(status, "Failed")
    assert decision.action is Action.NONE
    assert [e[0] for e in decision.events] == ["Normal"]
    assert_valid_status(decision)


def test_decide_leaves_the_observed_status_untouched() -> None:
    previous = {"phase": "Running", "progress": {"step": 1990, "totalSteps": 2000, "percent": 99}}
    snapshot = copy.deepcopy(previous)
    decide(observed(status=previous, workload=workload(COMPLETE), now=T2))
    assert previous == snapshot


# ---------------------------------------------------------------- decide: failing and restarting


def test_retryable_failure_restarts_all_ranks() -> None:
    pods = [OOM_BY_KERNEL, pod(1, phase="Running")]
    previous = {"phase": "Running", "restarts": 1}
    decision = decide(
        observed(status=previous, workload=workload(FAILED), pods=pods, backoff_limit=3)
    )
    assert decision.action is Action.RESTART
    assert decision.status["restarts"] == 2
    assert decision.status["phase"] == "Pending"
    restarting = condition(decision.status, "Restarting")
    assert restarting["status"] == "True"
    assert restarting["reason"] == "OOMKilled"
    warnings = [e for e in decision.events if e[0] == "Warning"]
    assert len(warnings) == 1
    assert warnings[0][1] == "OOMKilled"
    assert "2/3" in warnings[0][2]
    assert_valid_status(decision)


@pytest.mark.parametrize("restarts", [3, 4])
def test_retryable_failure_past_the_backoff_limit_fails(restarts: int) -> None:
    decision = decide(
        observed(
            status={"phase": "Running", "restarts": restarts},
            workload=workload(FAILED),
            pods=[OOM_BY_KERNEL],
            backoff_limit=3,
        )
    )
    assert decision.action is Action.NONE
    assert decision.status["phase"] == "Failed"
    assert decision.status["restarts"] == restarts
    failed = condition(decision.status, "Failed")
    assert failed["status"] == "True"
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "out of memory" in failed["message"]
    assert [e[0] for e in decision.events] == ["Warning"]


def test_backoff_limit_zero_never_restarts() -> None:
    decision = decide(observed(workload=workload(FAILED), pods=[CRASH], backoff_limit=0))
    assert decision.status["phase"] == "Failed"
    assert decision.action is Action.NONE


@pytest.mark.parametrize(
    ("failed_pod", "reason"),
    [(BAD_DATA, "BadData"), (BAD_CONFIG, "InvalidConfiguration")],
    ids=["bad-data", "bad-config"],
)
def test_non_retryable_failure_fails_at_once(failed_pod: Obj, reason: str) -> None:
    failed_by_policy = job_condition(
        "Failed", "PodFailurePolicy", "Container trainer failed with exit code matching FailJob"
    )
    decision = decide(
        observed(
            status={"phase": "Running"},
            workload=workload(failed_by_policy),
            pods=[failed_pod],
            backoff_limit=5,
        )
    )
    assert decision.action is Action.NONE
    assert decision.status["phase"] == "Failed"
    assert decision.status["restarts"] == 0
    failed = condition(decision.status, "Failed")
    assert failed["reason"] == reason
    assert (
        json.loads(failed_pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"])[
            "message"
        ]
        in failed["message"]
    )


def test_a_failed_job_waits_for_the_failed_pod_that_says_why() -> None:
    """The Job watch may show Failed while the pod watch still shows the pod running:
    deciding then would restart a bad-data job as a crash. It waits for the pod, and only
    a pod that never shows leaves the Job's message to explain, POD_FAILURE_GRACE later."""
    previous = {"phase": "Running", "restarts": 0}
    still_running = [pod(0, phase="Running")]
    early = decide(observed(status=previous, workload=workload(FAILED), pods=still_running, now=T1))
    assert early.action is Action.NONE
    assert early.status["phase"] == "Running"
    assert early.status["restarts"] == 0
    assert early.events == []

    caught_up = decide(
        observed(status=previous, workload=workload(FAILED), pods=[BAD_DATA], now=T1)
    )
    assert caught_up.status["phase"] == "Failed"
    assert condition(caught_up.status, "Failed")["reason"] == "BadData"

    pod_gone = decide(
        observed(status=previous, workload=workload(FAILED), pods=[], now=T2, backoff_limit=3)
    )
    assert pod_gone.action is Action.RESTART
    assert condition(pod_gone.status, "Restarting")["reason"] == "Crashed"
    assert "backoff limit" in condition(pod_gone.status, "Restarting")["message"]


def test_deadline_exceeded_fails() -> None:
    deadline = job_condition("Failed", "DeadlineExceeded", "Job was active longer than specified")
    decision = decide(
        observed(
            status={"phase": "Running"},
            workload=workload(deadline),
            pods=[pod(exit_code=143)],
            backoff_limit=5,
        )
    )
    assert decision.status["phase"] == "Failed"
    assert condition(decision.status, "Failed")["reason"] == "DeadlineExceeded"
    assert decision.action is Action.NONE


def test_the_root_cause_decides_not_the_first_pod_listed() -> None:
    failed_by_policy = job_condition(
        "Failed",
        "PodFailurePolicy",
        f"Container trainer for pod ns/{JOB}-0-1-x7k2p failed with exit code 3 matching "
        "FailJob rule at index 0",
    )
    rank0 = pod(
        0,
        exit_code=1,
        finished_at=T2,
        message="torch.distributed.elastic.rendezvous.api.RendezvousClosedError",
    )
    rank1 = copy.deepcopy(BAD_DATA)
    rank1["metadata"]["name"] = f"{JOB}-0-1-x7k2p"
    decision = decide(
        observed(
            status={"phase": "Running"},
            workload=workload(failed_by_policy),
            pods=[rank0, rank1],  # the API lists pods by name
            backoff_limit=5,
        )
    )
    assert decision.status["phase"] == "Failed"
    assert condition(decision.status, "Failed")["reason"] == "BadData"


# ---------------------------------------------------------------- decide: terminal phases


def _finished(phase: str) -> Obj:
    reason = "TrainingSucceeded" if phase == "Succeeded" else "BadData"
    conditions: list[Obj] = []
    for type_, value in (
        ("Ready", phase == "Succeeded"),
        ("Succeeded", phase == "Succeeded"),
        ("Failed", phase == "Failed"),
        ("Stalled", phase == "Failed"),
        ("Reconciling", False),
    ):
        conditions = set_condition(conditions, type_, value, reason, "done", 1, T0)
    status: Obj = {"phase": phase, "conditions": conditions, "restarts": 1, "completionTime": T0}
    if phase == "Succeeded":
        status["output"] = {"uri": OUTPUT_URI, "kind": "full"}
    return status


WHATEVER_IS_OBSERVED: list[Obj] = [
    {},
    {"suspend": True},
    {"workload": workload(FAILED), "pods": [OOM_BY_KERNEL]},
    {"workload": workload(COMPLETE)},
    {"workload": workload(), "pods": [pod(0, phase="Running"), pod(1, phase="Running")]},
    {"dependencies": {"FinetuneJob sft (spec.model)": None}},
    {"dependencies": {"FinetuneJob sft (spec.model)": {"status": {"phase": "Failed"}}}},
    {"generation": 2},
]


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
@pytest.mark.parametrize("seen", WHATEVER_IS_OBSERVED)
def test_terminal_phases_never_change(phase: str, seen: Obj) -> None:
    before = _finished(phase)
    decision = decide(observed(status=copy.deepcopy(before), now=T2, **seen))
    assert decision.action is Action.NONE
    assert decision.events == []
    assert {k: v for k, v in decision.status.items() if k != "observedGeneration"} == before
    assert decision.status["observedGeneration"] == seen.get("generation", 1)


# ---------------------------------------------------------------- decide: fromJob


@pytest.mark.parametrize(
    "dependency",
    [
        None,
        {"status": {}},
        {"status": {"phase": "Running"}},
        {"status": {"phase": "Pending"}},
    ],
    ids=["missing", "new", "running", "pending"],
)
def test_waits_for_the_model_job(dependency: Obj | None) -> None:
    decision = decide(observed(dependencies={"FinetuneJob sft (spec.model)": dependency}))
    assert decision.status["phase"] == "Pending"
    reconciling = condition(decision.status, "Reconciling")
    assert reconciling["reason"] == "WaitingForModel"
    assert "sft" in reconciling["message"]
    assert decision.action is Action.NONE  # nothing to train on yet: no children


def test_failed_model_job_fails_the_job() -> None:
    decision = decide(
        observed(dependencies={"FinetuneJob sft (spec.model)": {"status": {"phase": "Failed"}}})
    )
    assert decision.status["phase"] == "Failed"
    assert is_true(decision.status, "Failed") and is_true(decision.status, "Stalled")
    assert "sft" in condition(decision.status, "Failed")["message"]
    assert decision.action is Action.NONE
    assert [e[0] for e in decision.events] == ["Warning"]


def test_succeeded_model_job_lets_training_start() -> None:
    decision = decide(
        observed(
            dependencies={
                "FinetuneJob sft (spec.model)": {
                    "status": {"phase": "Succeeded", "output": {"uri": "pvc://a/b/final"}}
                }
            },
        )
    )
    assert decision.action is Action.APPLY
    assert decision.status["phase"] == "Pending"


def test_waits_for_every_referenced_job_and_names_each() -> None:
    # An AlignmentJob: the SFT model is done, the reward model's job still runs.
    decision = decide(
        observed(
            dependencies={
                "FinetuneJob sft (spec.model)": {"status": {"phase": "Succeeded"}},
                "AlignmentJob rm (spec.method.rewards[0].model)": {"status": {"phase": "Running"}},
            }
        )
    )
    assert decision.action is Action.NONE
    message = condition(decision.status, "Reconciling")["message"]
    assert "AlignmentJob rm (spec.method.rewards[0].model) to succeed (now Running)" in message
    assert "sft" not in message


# ---------------------------------------------------------------- kstatus


RUNNING_PODS = [pod(0, phase="Running"), pod(1, phase="Running")]


@pytest.mark.parametrize(
    ("seen", "phase", "expected"),
    [
        pytest.param(
            {"workload": workload(), "pods": RUNNING_PODS},
            "Running",
            {"Reconciling": True, "Ready": False},
            id="running",
        ),
        pytest.param(
            {"workload": workload(COMPLETE)},
            "Succeeded",
            {"Ready": True, "Reconciling": False, "Stalled": False, "Failed": False},
            id="succeeded",
        ),
        pytest.param(
            {"workload": workload(FAILED), "pods": [BAD_DATA]},
            "Failed",
            {"Stalled": True, "Ready": False, "Reconciling": False, "Succeeded": False},
            id="failed",
        ),
        pytest.param(
            {"suspend": True},
            "Suspended",
            {"Suspended": True, "Reconciling": False, "Ready": False},
            id="suspended",
        ),
    ],
)
def test_kstatus_conditions(seen: Obj, phase: str, expected: dict[str, bool]) -> None:
    decision = decide(observed(status={"phase": "Pending"}, **seen))
    assert decision.status["phase"] == phase
    got = {type_: is_true(decision.status, type_) for type_ in expected}
    assert got == expected
    for cond in decision.status["conditions"]:
        assert cond["observedGeneration"] == 1
        assert cond["reason"]
    assert_valid_status(decision)
