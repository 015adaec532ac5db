"""Pure lifecycle decisions: from what the cluster shows to the job's status and next step.

`observe` gathers nothing itself: the handler passes in the child Job of the
current attempt, its pods and the referenced job (for fromJob). `decide`
returns the status to write, the events to record and the one action to take.
Terminal states never change again (no flapping).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from lmforge.operator import timestamps

from lmforge.api.runconfig import (
    EXIT_BAD_CONFIG,
    EXIT_BAD_DATA,
    EXIT_OUT_OF_MEMORY,
    REPORT_CHECKPOINT,
    REPORT_PROGRESS,
)

TERMINAL_PHASES = ("Succeeded", "Failed")


class Failure(StrEnum):
    """Why a pod failed, and so whether retrying can help."""

    OUT_OF_MEMORY = "OOMKilled"
    DISRUPTED = "Disrupted"  # evicted, preempted, node lost: not the job's fault
    RENDEZVOUS_TIMEOUT = "RendezvousTimeout"
    BAD_DATA = "BadData"
    BAD_CONFIG = "InvalidConfiguration"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    CRASHED = "Crashed"

    @property
    def retryable(self) -> bool:
        return self not in (Failure.BAD_DATA, Failure.BAD_CONFIG, Failure.DEADLINE_EXCEEDED)


_RENDEZVOUS_MARKERS = ("nccl", "rendezvous", "watchdog caught collective", "timed out", "c10d")


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    """The termination state that explains the pod: a failed init container (e.g. a
    fetch that could not download) first, else the first terminated container."""
    status = pod.get("status", {})
    for key in ("initContainerStatuses", "containerStatuses"):
        for container in status.get(key) or []:
            state = container.get("state", {}).get("terminated")
            if state and (key == "containerStatuses" or state.get("exitCode")):
                return dict(state) | {"container": container.get("name", "")}
    return {}


# The trainer's termination message names the reason even when torchrun, between the
# worker and the container, turns the worker's exit code into its own.
_MESSAGE_REASONS = {
    "BadData": Failure.BAD_DATA,
    "InvalidRunConfig": Failure.BAD_CONFIG,
    "InvalidMethod": Failure.BAD_CONFIG,
    "OutOfMemory": Failure.OUT_OF_MEMORY,
}


def classify_pod_failure(pod: dict[str, Any]) -> tuple[Failure, str]:
    """Class and a one-line explanation of a failed pod.

    Reads, in order: disruption conditions and eviction reasons (node lost,
    preemption, eviction), the trainer's termination message (its `reason`),
    the container's termination reason (OOMKilled), its exit code (the
    trainer's codes for bad data/config/OOM), and NCCL / rendezvous timeouts
    in the message.
    """
    status = pod.get("status", {})
    name = pod.get("metadata", {}).get("name", "pod")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return Failure.DISRUPTED, (
                f"{name} was disrupted ({cond.get('reason', 'Disruption')}): "
                f"{cond.get('message', '')}".rstrip(": ")
            )
    if status.get("reason") in ("Evicted", "Preempting", "NodeLost", "Terminated", "Shutdown"):
        return Failure.DISRUPTED, f"{name}: {status.get('reason')}: {status.get('message', '')}"
    state = _terminated(pod)
    reason, code = state.get("reason", ""), state.get("exitCode")
    message = (state.get("message") or "").strip()
    detail = _termination_detail(message)
    if state.get("container", "").startswith("fetch"):
        return Failure.CRASHED, f"{name}: fetching inputs failed (exit code {code}){detail}"
    reported = _MESSAGE_REASONS.get(_message_reason(message))
    if reason == "OOMKilled" or code == EXIT_OUT_OF_MEMORY or reported is Failure.OUT_OF_MEMORY:
        return Failure.OUT_OF_MEMORY, f"{name} ran out of memory ({reason or code}){detail}"
    if code == EXIT_BAD_DATA or reported is Failure.BAD_DATA:
        return Failure.BAD_DATA, f"{name}: bad training data{detail}"
    if code == EXIT_BAD_CONFIG or reported is Failure.BAD_CONFIG:
        return Failure.BAD_CONFIG, f"{name}: invalid configuration{detail}"
    if any(marker in message.lower() for marker in _RENDEZVOUS_MARKERS):
        return Failure.RENDEZVOUS_TIMEOUT, f"{name}: rendezvous/NCCL timeout{detail}"
    return Failure.CRASHED, f"{name} exited with code {code} ({reason or 'Error'}){detail}"


# When several ranks fail, the most telling one explains the job: a rank with bad data
# makes the others fail on the rendezvous, not the other way round.
_ROOT_CAUSE_ORDER = (
    Failure.BAD_DATA,
    Failure.BAD_CONFIG,
    Failure.OUT_OF_MEMORY,
    Failure.DISRUPTED,
    Failure.CRASHED,
    Failure.RENDEZVOUS_TIMEOUT,
)


def root_cause(pods: list[dict[str, Any]]) -> tuple[Failure, str] | None:
    """The failure that explains a set of failed pods, or None when none failed."""
    found = [classify_pod_failure(p) for p in pods]
    if not found:
        return None
    return min(found, key=lambda f: _ROOT_CAUSE_ORDER.index(f[0]))


def _message_reason(message: str) -> str:
    try:
        parsed = json.loads(message)
    except ValueError:
        return ""
    return str(parsed.get("reason", "")) if isinstance(parsed, dict) else ""


def _termination_detail(message: str) -> str:
    if not message:
        return ""
    try:
        parsed = json.loads(message)
        message = str(parsed.get("message", message))
    except (ValueError, AttributeError):
        pass
    return f": {message.splitlines()[0][:300]}" if message else ""


# ---------------------------------------------------------------- decisions


class Action(StrEnum):
    NONE = "none"
    APPLY = "apply"  # create or converge the children of the current attempt
    RESTART = "restart"  # next attempt: status first, then a fresh Job (all ranks)


@dataclass
class Decision:
    status: dict[str, Any]
    action: Action = Action.NONE
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


@dataclass(frozen=True)
class Observed:
    """What the handler read from the cluster for one job."""

    generation: int
    status: dict[str, Any]
    backoff_limit: int
    suspend: bool
    queued: bool
    # Jobs referenced by fromJob (model, referenceModel, reward models), by a description
    # such as "FinetuneJob sft (spec.model)"; None: the job does not exist.
    dependencies: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    workload: dict[str, Any] | None = None  # the batch/v1 Job of the current attempt
    pods: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, str] = field(default_factory=dict)  # data of the job's report ConfigMap
    # Volumes the pods need that do not exist, e.g. 'PersistentVolumeClaim "data" not found'
    missing_volumes: list[str] = field(default_factory=list)
    output_uri: str = ""
    output_kind: str = "adapter"
    output_claim: str = ""  # the output PVC, mounted at output_mount in the pods
    output_mount: str = ""
    now: str = ""


def find_condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    """The condition of this type, if any."""
    return next((c for c in conditions if c.get("type") == type_), None)


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    at: str,
) -> list[dict[str, Any]]:
    """Upsert a condition; lastTransitionTime changes only when status flips."""
    value = "True" if status else "False"
    out = [c for c in conditions if c.get("type") != type_]
    old = find_condition(conditions, type_)
    changed = old is None or old.get("status") != value
    out.append(
        {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": at
            if changed or old is None
            else old.get("lastTransitionTime", at),
            "observedGeneration": generation,
        }
    )
    return sorted(out, key=lambda c: c["type"])


def _job_condition(workload: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in workload.get("status", {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def _reported(obs: Observed, key: str) -> dict[str, Any] | None:
    """A JSON report the trainer (rank 0) left in the job's report ConfigMap."""
    text = obs.report.get(key)
    if not text:
        return None
    try:
        found = json.loads(text)
    except ValueError:
        return None
    return dict(found) if isinstance(found, dict) else None


def _last_checkpoint(obs: Observed) -> dict[str, Any] | None:
    """status.lastCheckpoint: the trainer's path inside the pod as a pvc:// URI."""
    report = _reported(obs, REPORT_CHECKPOINT)
    if not report or "step" not in report:
        return None
    path = str(report.get("path", ""))
    uri = path
    if obs.output_mount and path.startswith(obs.output_mount + "/"):
        uri = f"pvc://{obs.output_claim}/{path[len(obs.output_mount) + 1 :]}"
    out = {"step": int(report["step"]), "uri": uri}
    if report.get("time"):
        out["time"] = report["time"]
    return out


def _final_metrics(pods: list[dict[str, Any]]) -> dict[str, float]:
    for pod in pods:
        message = _terminated(pod).get("message") or ""
        try:
            summary = json.loads(message)
        except ValueError:
            continue
        metrics = summary.get("metrics") if isinstance(summary, dict) else None
        if isinstance(metrics, dict):
            return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return {}


class _Status:
    """Builder for the next status (keeps conditions and timestamps consistent)."""

    def __init__(self, obs: Observed) -> None:
        self.obs = obs
        self.data = dict(obs.status)
        self.data.setdefault("restarts", 0)
        self.data["observedGeneration"] = obs.generation
        self.events: list[tuple[str, str, str]] = []

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.data["conditions"] = set_condition(
            self.data.get("conditions") or [],
            type_,
            status,
            reason,
            message,
            self.obs.generation,
            self.obs.now,
        )

    def phase(self, phase: str, reason: str, message: str, event: bool = True) -> None:
        """Move to `phase`; a change of phase is an Event unless `event` is False (the
        routine start: creating the workload, waiting for its pods, is in status only)."""
        previous = self.obs.status.get("phase")
        self.data["phase"] = phase
        in_progress = phase not in TERMINAL_PHASES and phase != "Suspended"
        self.condition("Reconciling", in_progress, reason, message)
        self.condition("Ready", phase == "Succeeded", reason, message)
        self.condition("Suspended", phase == "Suspended", reason, message)
        if phase in TERMINAL_PHASES:
            self.condition("Succeeded", phase == "Succeeded", reason, message)
            self.condition("Failed", phase == "Failed", reason, message)
            self.condition("Stalled", phase == "Failed", reason, message)
            self.data.setdefault("completionTime", self.obs.now)
        if event and previous != phase:
            kind = "Warning" if phase == "Failed" else "Normal"
            self.events.append((kind, reason, f"{previous or 'New'} -> {phase}: {message}"))

    def stall(self, reason: str, message: str) -> None:
        """Say why the job cannot go on: the Stalled condition, and a Warning Event the
        first time it stalls for this reason."""
        if _stalled_for(self.obs.status) != reason:
            self.events.append(("Warning", reason, message))
        self.condition("Stalled", True, reason, message)

    def decision(self, action: Action = Action.NONE) -> Decision:
        return Decision(self.data, action, self.events)


def decide(obs: Observed) -> Decision:
    """The next status and action for a training job."""
    status = _Status(obs)
    if obs.status.get("phase") in TERMINAL_PHASES:
        return status.decision()  # terminal: only observedGeneration may move

    dependency = _check_dependency(obs, status)
    if dependency is not None:
        return dependency
    if obs.missing_volumes:
        message = "; ".join(obs.missing_volumes) + ": create it, or fix the spec"
        status.phase("Pending", "MissingVolume", message, event=False)
        status.stall("MissingVolume", message)
        return status.decision()
    if _stalled_for(status.data) == "MissingVolume":
        status.condition("Stalled", False, "VolumesFound", "every referenced volume exists")

    workload = obs.workload
    if workload is None:
        if obs.suspend:
            status.phase("Suspended", "Suspended", "runPolicy.suspend is set; no pods run")
        else:
            status.phase("Pending", "Creating", "creating the training workload", event=False)
        return status.decision(Action.APPLY)

    if (cond := _job_condition(workload, "Complete")) or _job_condition(
        workload, "SuccessCriteriaMet"
    ):
        status.data["output"] = {"uri": obs.output_uri, "kind": obs.output_kind}
        metrics = _final_metrics(obs.pods)
        if metrics:
            status.data["metrics"] = metrics
        progress = dict(status.data.get("progress") or {})  # never modify what was observed
        if progress.get("totalSteps"):
            progress |= {"step": progress["totalSteps"], "percent": 100, "etaSeconds": 0}
            status.data["progress"] = progress
        status.data["completionTime"] = (cond or {}).get("lastTransitionTime") or obs.now
        status.phase("Succeeded", "TrainingSucceeded", f"output written to {obs.output_uri}")
        return status.decision()

    failed = _job_condition(workload, "Failed") or _job_condition(workload, "FailureTarget")
    if failed:
        return _handle_failure(obs, status, failed)

    return _running(obs, status)


def _check_dependency(obs: Observed, status: _Status) -> Decision | None:
    """Wait until every referenced job has succeeded; fail if one of them failed."""
    missing, unfinished = [], []
    for name, dep in obs.dependencies.items():
        phase = ((dep or {}).get("status") or {}).get("phase")
        if dep is not None and phase == "Failed":
            status.phase("Failed", "ModelJobFailed", f"{name} failed; no model to train")
            return status.decision()
        if dep is None:
            missing.append(f"{name}, which does not exist yet")
        elif phase != "Succeeded":
            unfinished.append(f"{name} to succeed (now {phase or 'Pending'})")
    waiting = missing + unfinished
    if waiting:
        status.phase("Pending", "WaitingForModel", "waiting for " + "; ".join(waiting))
        return status.decision()
    return None


def _handle_failure(obs: Observed, status: _Status, failed: dict[str, Any]) -> Decision:
    if failed.get("reason") == "DeadlineExceeded":
        status.phase(
            "Failed",
            Failure.DEADLINE_EXCEEDED.value,
            f"runPolicy.activeDeadlineSeconds exceeded: {failed.get('message', '')}",
        )
        return status.decision()
    failed_pods = [p for p in obs.pods if p.get("status", {}).get("phase") == "Failed"]
    cause = root_cause(failed_pods)
    if cause is None and timestamps.seconds_between(failed.get("lastTransitionTime"), obs.now) < (
        POD_FAILURE_GRACE_SECONDS
    ):
        # The Job and pod watches are separate streams: the Job may say Failed before the
        # failed pod that says why reaches us. Its event brings the next reconcile; only a
        # pod that never shows (deleted) leaves the Job's own message to explain.
        return status.decision()
    failure, message = cause or (
        Failure.CRASHED,
        failed.get("message") or "the workload failed",
    )
    if not failure.retryable:
        status.phase("Failed", failure.value, message)
        return status.decision()
    restarts = int(status.data.get("restarts", 0))
    if restarts >= obs.backoff_limit:
        status.phase(
            "Failed",
            "BackoffLimitExceeded",
            f"{message}; gave up after {restarts} restarts (runPolicy.backoffLimit)",
        )
        return status.decision()
    status.data["restarts"] = restarts + 1
    status.condition(
        "Restarting",
        True,
        failure.value,
        f"restart {restarts + 1} of {obs.backoff_limit}: {message}",
    )
    status.events.append(
        (
            "Warning",
            failure.value,
            f"restarting all ranks from the last checkpoint "
            f"({restarts + 1}/{obs.backoff_limit}): {message}",
        )
    )
    status.phase("Pending", "Restarting", message, event=False)
    return status.decision(Action.RESTART)


# How long a failed Job waits for a failed pod to explain it before its own message does.
POD_FAILURE_GRACE_SECONDS = 30


def _running(obs: Observed, status: _Status) -> Decision:
    spec = obs.workload.get("spec", {}) if obs.workload else {}
    if spec.get("suspend"):
        if obs.suspend:
            status.phase("Suspended", "Suspended", "runPolicy.suspend is set; checkpoints are kept")
        else:
            status.phase(
                "Pending",
                "Queued",
                "waiting for Kueue to admit the workload"
                if obs.queued
                else "waiting for the workload to start",
            )
        return status.decision(Action.APPLY)
    pods = [p for p in obs.pods if p.get("status", {}).get("phase") in ("Pending", "Running")]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    expected = int(spec.get("parallelism", 1))
    progress = _reported(obs, REPORT_PROGRESS)
    if progress:
        status.data["progress"] = progress
    checkpoint = _last_checkpoint(obs)
    if checkpoint:
        status.data["lastCheckpoint"] = checkpoint
    stuck = why_pods_wait(pods)
    if running and len(running) >= expected:
        status.data.setdefault("startTime", obs.now)
        status.condition("Restarting", False, "Running", "all ranks are running")
        status.phase("Running", "Training", f"{len(running)} of {expected} pods running")
    elif stuck is not None:
        reason, message = stuck
        status.phase(
            "Initializing",
            reason,
            f"{len(running)} of {expected} pods running; {message}",
            event=False,
        )
        status.stall(reason, message)
    else:
        status.phase(
            "Initializing",
            "PodsStarting",
            f"{len(running)} of {expected} pods running",
            event=False,
        )
    if stuck is None and _stalled_for(status.data) is not None:
        status.condition("Stalled", False, "PodsStarting", "the pods are no longer stuck")
    return status.decision(Action.APPLY)


# What keeps a pod from starting, as the scheduler or the kubelet reports it, by the reason
# a user reads in status (the container's waiting reason -> ours).
_WAITING_REASONS = {
    "ErrImagePull": "ImagePullFailed",
    "ImagePullBackOff": "ImagePullFailed",
    "InvalidImageName": "ImagePullFailed",
    "CreateContainerConfigError": "InvalidPodConfig",
}


def why_pods_wait(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) when a pod cannot start and will not without a change: the
    scheduler found no node (Unschedulable, with the scheduler's own message), an image
    cannot be pulled, or a referenced Secret is missing; None otherwise."""
    for pod in sorted(pods, key=lambda p: p["metadata"].get("name", "")):
        name, pod_status = pod["metadata"].get("name", ""), pod.get("status") or {}
        for cond in pod_status.get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                return "Unschedulable", f"pod {name}: {cond.get('message', 'no node fits')}"
        containers = (pod_status.get("initContainerStatuses") or []) + (
            pod_status.get("containerStatuses") or []
        )
        for container in containers:
            waiting = (container.get("state") or {}).get("waiting") or {}
            ours = _WAITING_REASONS.get(waiting.get("reason", ""))
            if ours is None:
                continue
            detail = waiting.get("message", "")
            if ours == "InvalidPodConfig" and "secret" in detail.lower():
                ours = "MissingSecret"
            return (
                ours,
                f"pod {name}, container {container.get('name')}: {waiting['reason']}: {detail}",
            )
    return None


def _stalled_for(data: dict[str, Any]) -> str | None:
    """Why the job is stalled (the Stalled condition's reason), if it is."""
    found = find_condition(data.get("conditions") or [], "Stalled")
    return str(found.get("reason")) if found and found.get("status") == "True" else None
