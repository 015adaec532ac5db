"""An InferenceService's status from what the cluster shows (pure).

Inputs: the spec's adapters with their resolved URIs, the referenced jobs, the Deployment
and the replicas' reports (the report ConfigMap: one key per pod, written by `lmforge
serve`). Output: the status (url, phase, replicas, conditions Ready / ModelLoaded /
AdaptersLoaded, per-adapter state and loadedReplicas).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lmforge.operator.training.lifecycle import set_condition


@dataclass(frozen=True)
class AdapterRef:
    """One spec.adapters entry as the operator resolved it."""

    name: str
    uri: str  # '' while its job has no output
    waiting_for: str  # "FinetuneJob x" for fromJob adapters, '' otherwise
    job_failed: bool = False
    problem: str = ""  # why it cannot be served as written


@dataclass(frozen=True)
class ServingObserved:
    generation: int
    status: dict[str, Any]
    url: str
    model_uri: str  # '' while spec.model's job has no output
    model_waiting_for: str
    model_job_failed: bool
    adapters: list[AdapterRef]
    deployment: dict[str, Any] | None
    # The fewest ready replicas that are not Degraded: spec.replicas, or the autoscaler's
    # floor (a scale-up in progress is not a degradation).
    desired_replicas: int
    reports: dict[str, str]  # pod name -> the replica's JSON report
    live_pods: set[str]
    now: str


def parse_reports(reports: dict[str, str], live_pods: set[str]) -> dict[str, dict[str, Any]]:
    """Reports of pods that still exist (a replaced pod's last word no longer counts)."""
    out = {}
    for pod, text in reports.items():
        if pod not in live_pods:
            continue
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict):
            out[pod] = data
    return out


def adapter_status(ref: AdapterRef, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One adapter's state: Pending (no output yet, or not on disk yet), Loading, Loaded
    (every reporting replica has it), Failed (its job failed, or a replica rejected it)."""
    entry: dict[str, Any] = {"name": ref.name, "loadedReplicas": 0}
    if ref.uri:
        entry["uri"] = ref.uri
    if ref.problem:
        return entry | {"state": "Failed", "message": ref.problem}
    if ref.job_failed:
        return entry | {"state": "Failed", "message": f"{ref.waiting_for} failed"}
    if not ref.uri:
        return entry | {"state": "Pending", "message": f"waiting for {ref.waiting_for} to succeed"}
    seen = [(r.get("adapters") or {}).get(ref.name) for r in reports.values()]
    states = [s for s in seen if isinstance(s, dict) and s.get("path")]
    loaded = sum(1 for s in states if s.get("state") == "Loaded")
    entry["loadedReplicas"] = loaded
    failed = [s for s in states if s.get("state") == "Failed"]
    if failed:
        return entry | {"state": "Failed", "message": str(failed[0].get("message", ""))[:500]}
    if states and loaded == len(reports):
        return entry | {"state": "Loaded", "message": ""}
    if any(s.get("state") == "Pending" for s in states) and not loaded:
        return entry | {"state": "Pending", "message": "not on the replicas' volumes yet"}
    return entry | {"state": "Loading", "message": f"loaded on {loaded} of {len(reports)} replicas"}


def decide_status(obs: ServingObserved) -> dict[str, Any]:
    """The new status (unchanged fields keep their values; conditions keep their times)."""
    reports = parse_reports(obs.reports, obs.live_pods)
    deployment_status = (obs.deployment or {}).get("status") or {}
    replicas = int(deployment_status.get("replicas") or 0)
    ready = int(deployment_status.get("readyReplicas") or 0)
    # How many replicas are wanted now: with autoscaling, what the HPA last chose.
    wanted = ((obs.deployment or {}).get("spec") or {}).get("replicas")
    wanted = obs.desired_replicas if wanted is None else int(wanted)
    adapters = [adapter_status(a, reports) for a in obs.adapters]
    conditions = list(obs.status.get("conditions") or [])

    def condition(type_: str, value: bool, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(
            conditions, type_, value, reason, message, obs.generation, obs.now
        )

    model_loaded = ready > 0 or any(r.get("modelLoaded") for r in reports.values())
    if obs.model_job_failed:
        phase = "Failed"
        condition("ModelLoaded", False, "JobFailed", f"{obs.model_waiting_for} failed")
    elif not obs.model_uri:
        phase = "Pending"
        condition(
            "ModelLoaded",
            False,
            "WaitingForJob",
            f"waiting for {obs.model_waiting_for} to succeed",
        )
    elif model_loaded:
        phase = "Loading"
        condition("ModelLoaded", True, "Loaded", f"{obs.model_uri} answers")
    else:
        phase = "Loading"
        condition("ModelLoaded", False, "Loading", f"loading {obs.model_uri}")

    not_loaded = [a for a in adapters if a["state"] != "Loaded"]
    if not_loaded:
        first = not_loaded[0]
        condition(
            "AdaptersLoaded",
            False,
            "AdapterFailed" if any(a["state"] == "Failed" for a in not_loaded) else "Pending",
            f"{len(not_loaded)} of {len(adapters)} not loaded; {first['name']}: "
            f"{first['state']} {first.get('message', '')}".strip(),
        )
    else:
        condition("AdaptersLoaded", True, "Loaded", f"{len(adapters)} adapter(s) loaded")

    serving = phase == "Loading" and ready > 0
    if serving:
        degraded = ready < obs.desired_replicas or any(a["state"] == "Failed" for a in adapters)
        phase = "Degraded" if degraded else "Ready"
        condition("Ready", True, phase, f"{ready} of {wanted} replicas ready")
    else:
        condition("Ready", False, phase, f"{ready} of {wanted} replicas ready")

    status = dict(obs.status)
    status.update(
        {
            "phase": phase,
            "url": obs.url,
            "replicas": replicas,
            "readyReplicas": ready,
            "adapters": adapters,
            "conditions": conditions,
            "observedGeneration": obs.generation,
        }
    )
    if obs.model_uri:
        status["modelUri"] = obs.model_uri
    return status
