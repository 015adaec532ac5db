"""Chaos: the operator is SIGKILLed at random points across many job lifecycles.

Whatever moment it dies at (mid-reconcile, between a status write and a Job
creation, during start-up), the restarted operator must converge: every job in
its right terminal state, at most one batch Job per job (the current attempt),
restarts counted exactly once, and no child without a living owner.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import pytest

from tests.integration.conftest import OperatorProcess, condition, wait_for
from tests.integration.test_operator import job
from tests.kube import Kube

pytestmark = pytest.mark.cluster

# (label on the job, expected phase, expected reason, expected restarts)
OUTCOMES = {
    "ok": ({}, "Succeeded", "TrainingSucceeded", 0),
    "bad": ({"lmforge.io/kwok-fail": "bad-data"}, "Failed", "BadData", 0),
    "oom": ({"lmforge.io/kwok-fail": "oom"}, "Failed", "BackoffLimitExceeded", 1),
}
PLAN = ["ok"] * 36 + ["bad"] * 9 + ["oom"] * 9  # 54 lifecycles


class Killer(threading.Thread):
    """SIGKILLs the operator after a random 0.5-6 s of life and starts it again."""

    def __init__(self, operator: OperatorProcess, seed: int) -> None:
        super().__init__(daemon=True)
        self.operator, self.rng = operator, random.Random(seed)
        self.stop = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(0.5, 6.0)):
            self.operator.kill()
            self.kills += 1
            self.operator.start()


def test_operator_killed_at_random_points(
    crds: Kube, operator: OperatorProcess, namespace: str
) -> None:
    rng = random.Random(20261121)
    plan = PLAN[:]
    rng.shuffle(plan)
    names = {f"chaos-{i:02d}-{kind}": kind for i, kind in enumerate(plan)}
    killer = Killer(operator, seed=7)
    killer.start()
    started = time.monotonic()
    try:
        items = list(names.items())
        for wave in range(0, len(items), 9):
            crds.apply(
                [
                    job(n, OUTCOMES[k][0], runPolicy={"backoffLimit": 1})
                    for n, k in items[wave : wave + 9]
                ],
                "-n",
                namespace,
            )
            time.sleep(rng.uniform(0.5, 2.5))

        def terminal() -> dict[str, Any] | None:
            listed = crds.get("finetunejobs", "-n", namespace)["items"]
            phases = {o["metadata"]["name"]: (o.get("status") or {}).get("phase") for o in listed}
            done = all(phases.get(n) in ("Succeeded", "Failed") for n in names)
            return {o["metadata"]["name"]: o for o in listed} if done else None

        wait_for(terminal, "every job terminal", timeout=600, interval=1)
    finally:
        killer.stop.set()
        killer.join()
    elapsed = time.monotonic() - started
    operator.wait_ready()
    time.sleep(8)  # two resyncs by a healthy operator: terminal states must hold

    jobs = {o["metadata"]["name"]: o for o in crds.get("finetunejobs", "-n", namespace)["items"]}
    wrong = []
    for name, kind in names.items():
        _, phase, reason, restarts = OUTCOMES[kind]
        status = jobs[name]["status"]
        decisive = condition(status, "Succeeded" if phase == "Succeeded" else "Failed")
        got = (status["phase"], decisive and decisive["reason"], status.get("restarts", 0))
        if got != (phase, reason, restarts):
            wrong.append((name, got))
    assert not wrong, wrong

    # No duplicate workload: at most one batch Job per job, and it is the current attempt.
    workloads = crds.get("jobs", "-n", namespace)["items"]
    per_job = Counter(w["metadata"]["labels"]["lmforge.io/job-name"] for w in workloads)
    assert max(per_job.values()) == 1, per_job
    for w in workloads:
        owner = w["metadata"]["labels"]["lmforge.io/job-name"]
        attempt = jobs[owner]["status"].get("restarts", 0)
        assert w["metadata"]["name"] == f"{owner}-{attempt}"

    # No orphan: every child is owned by a job that exists, with the right uid.
    uids = {o["metadata"]["uid"] for o in jobs.values()}
    for kind in (
        "jobs",
        "configmaps",
        "services",
        "persistentvolumeclaims",
        "serviceaccounts",
        "roles",
        "rolebindings",
    ):
        for child in crds.get(kind, "-n", namespace, "-l", "lmforge.io/job-name")["items"]:
            owners = child["metadata"].get("ownerReferences") or []
            assert [o["uid"] for o in owners if o.get("controller")] and all(
                o["uid"] in uids for o in owners
            ), (kind, child["metadata"]["name"])

    print(
        f"\nchaos: {len(names)} job lifecycles, {killer.kills} SIGKILLs of the operator, "
        f"all terminal after {elapsed:.0f}s; outcomes {Counter(names.values())}"
    )
    assert killer.kills >= 10
