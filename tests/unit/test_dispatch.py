"""The dispatcher's work-queue semantics: one reconcile per object at a time, events that
arrive meanwhile folded into one re-run that sees them."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from lmforge.operator.main import Dispatch
from lmforge.operator.metrics import OperatorMetrics
from lmforge.operator.settings import OperatorSettings
from lmforge.operator.watches import WorkQueue, work

KEY_A, KEY_B = ("FinetuneJob", "ml", "a"), ("FinetuneJob", "ml", "b")


class SlowReconciler:
    """Records each run and the newest 'state' it saw; the first run waits to be let go."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.runs: list[tuple[str, int]] = []
        self.state = 0
        self.fail_once = False

    def reconcile(self, kind: str, namespace: str, name: str) -> None:
        self.started.set()
        if not self.runs:
            assert self.release.wait(10)
        self.runs.append((name, self.state))
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("API server said no")


def dispatch_with(fake: Any) -> Dispatch:
    dispatch = Dispatch(None, OperatorSettings(), OperatorMetrics())  # type: ignore[arg-type]
    dispatch.by_kind["FinetuneJob"] = fake
    return dispatch


def test_events_during_a_reconcile_fold_into_one_rerun_that_sees_them() -> None:
    fake = SlowReconciler()
    dispatch = dispatch_with(fake)
    first = threading.Thread(target=dispatch.reconcile, args=("FinetuneJob", "ml", "a"))
    first.start()
    assert fake.started.wait(10)
    # Five events for the same job while it reconciles: none waits, none runs on its own.
    for state in range(1, 6):
        fake.state = state
        began = time.monotonic()
        dispatch.reconcile("FinetuneJob", "ml", "a")
        assert time.monotonic() - began < 1
    fake.release.set()
    first.join(10)
    assert fake.runs == [("a", 5), ("a", 5)]
    # Afterwards each event reconciles again.
    dispatch.reconcile("FinetuneJob", "ml", "a")
    assert len(fake.runs) == 3


def test_other_objects_are_not_held_up() -> None:
    fake = SlowReconciler()
    dispatch = dispatch_with(fake)
    first = threading.Thread(target=dispatch.reconcile, args=("FinetuneJob", "ml", "a"))
    first.start()
    assert fake.started.wait(10)
    fake.runs.append(("placeholder", -1))  # later runs do not wait
    dispatch.reconcile("FinetuneJob", "ml", "b")
    assert ("b", 0) in fake.runs
    fake.release.set()
    first.join(10)


def test_a_failed_reconcile_leaves_the_object_free_for_the_next_event() -> None:
    fake = SlowReconciler()
    fake.release.set()
    fake.fail_once = True
    dispatch = dispatch_with(fake)
    with pytest.raises(RuntimeError):
        dispatch.reconcile("FinetuneJob", "ml", "a")
    dispatch.reconcile("FinetuneJob", "ml", "a")
    assert len(fake.runs) == 2


def test_the_work_queue_keeps_each_waiting_key_once_oldest_first() -> None:
    queue = WorkQueue()
    for key in [KEY_A, KEY_B, KEY_A, KEY_A, KEY_B]:
        queue.add(key)
    assert len(queue) == 2
    assert [queue.take(0), queue.take(0), queue.take(0)] == [KEY_A, KEY_B, None]
    queue.add(KEY_A)  # taken keys may come again
    assert queue.take(0) == KEY_A


def test_keys_found_at_start_wait_behind_new_ones_unless_they_change() -> None:
    queue = WorkQueue()
    key_c = ("FinetuneJob", "ml", "c")
    queue.add(KEY_A, later=True)
    queue.add(KEY_B, later=True)
    queue.add(key_c)  # created after the operator started
    queue.add(KEY_B)  # changed since: no longer waits behind the rest
    queue.add(KEY_B, later=True)  # and stays ahead
    assert len(queue) == 3
    assert [queue.take(0) for _ in range(4)] == [key_c, KEY_B, KEY_A, None]


def test_a_waiting_worker_wakes_for_a_new_key() -> None:
    queue, got = WorkQueue(), []
    stop = threading.Event()
    worker = threading.Thread(target=work, args=(queue, got.append, stop))
    worker.start()
    queue.add(KEY_A)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    worker.join(5)
    assert got == [KEY_A] and not worker.is_alive()


def test_the_resync_leaves_jobs_waiting_in_the_queue_to_the_workers() -> None:
    """After a start every job waits in the queue; the resync must not reconcile them a
    second time beside the workers, only those no worker has reconciled for a while."""
    fake = SlowReconciler()
    fake.release.set()
    dispatch = dispatch_with(fake)
    known = [KEY_A, KEY_B]
    dispatch.cache.known = lambda indexes: list(known)  # type: ignore[method-assign]
    queue = WorkQueue()
    queue.add(KEY_A, later=True)
    assert KEY_A in queue and KEY_B not in queue
    assert dispatch.stale(10, waiting=queue) == [KEY_B]
    dispatch.reconcile(*KEY_B)
    assert dispatch.stale(10, waiting=queue) == []  # B was just reconciled
    assert queue.take(0) == KEY_A and KEY_A not in queue
    assert dispatch.stale(10, waiting=queue) == [KEY_A]
    assert sorted(dispatch.stale(0)) == [KEY_A, KEY_B]  # nothing is fresh for 0 s


def test_a_resync_queues_stale_jobs_behind_what_events_brought() -> None:
    """Under a backlog (a thousand jobs created at once) a resync must not reconcile beside
    the workers: it queues the stale jobs behind the new ones, and an event moves one ahead."""
    from lmforge.operator.kube import Kube
    from lmforge.operator.main import Operator

    fake = SlowReconciler()
    fake.release.set()
    dispatch = dispatch_with(fake)
    key_c, key_d = ("FinetuneJob", "ml", "c"), ("FinetuneJob", "ml", "d")
    known = [KEY_A, KEY_B, key_c]
    dispatch.cache.known = lambda indexes: list(known)  # type: ignore[method-assign]
    operator = Operator(Kube(), dispatch, ["ml"], 10, threading.Event())
    operator.queue.add(key_c)  # an event: the job was just created
    operator.resync()
    operator.resync()  # the stale jobs wait once
    operator.queue.add(key_d)  # created meanwhile: ahead of the resync's
    operator.queue.add(KEY_B)  # an event for a stale job: it goes ahead too
    assert fake.runs == []  # the resync reconciled nothing itself
    assert [operator.queue.take(0) for _ in range(5)] == [key_c, key_d, KEY_B, KEY_A, None]


def test_jobs_no_operator_acted_on_go_ahead_of_the_rest_found_at_start() -> None:
    """A fresh operator finds a thousand jobs: those it already reconciled (their status
    observed their generation) wait behind one created or changed while none ran."""
    from lmforge.operator.kube import Kube
    from lmforge.operator.main import Operator

    operator = Operator(Kube(), dispatch_with(SlowReconciler()), ["ml"], 10, threading.Event())
    on_event = operator._on_job_event("FinetuneJob")

    def job(name: str, generation: int, status: dict[str, Any] | None) -> dict[str, Any]:
        meta = {"namespace": "ml", "name": name, "generation": generation}
        return {"metadata": meta} | ({"status": status} if status is not None else {})

    on_event("ADDED", job("a", 1, {"phase": "Running", "observedGeneration": 1}))
    on_event("ADDED", job("b", 1, None))  # created while no operator ran
    on_event("ADDED", job("c", 2, {"phase": "Running", "observedGeneration": 1}))  # changed
    on_event("ADDED", job("d", 1, {"phase": "Succeeded", "observedGeneration": 1}))
    taken = [operator.queue.take(0) for _ in range(5)]
    assert taken == [KEY_B, ("FinetuneJob", "ml", "c"), KEY_A, ("FinetuneJob", "ml", "d"), None]
