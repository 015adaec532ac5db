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


def test_index_waiters_wake_only_when_the_set_flips() -> None:
    """kopf's readiness set of per-object toggles: waiters still resume exactly when the
    last toggle goes, but dropping the others wakes nobody (was: every waiter, every drop)."""
    import asyncio

    from kopf._cogs.aiokits import aiotoggles
    from lmforge.operator.main import wake_index_waiters_only_on_change

    wake_index_waiters_only_on_change()
    checks = 0

    def counted_all(states: Any) -> bool:
        nonlocal checks
        checks += 1
        return all(states)

    async def scenario() -> None:
        indexed = aiotoggles.ToggleSet(counted_all)
        objects = [await indexed.make_toggle(name=f"object-{i}") for i in range(200)]
        waiters = [asyncio.create_task(indexed.wait_for(True)) for _ in range(200)]
        await asyncio.sleep(0.01)
        before = checks
        for toggle in objects[:-1]:
            await indexed.drop_toggle(toggle)
            await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        assert checks - before <= 2 * 199 + 10  # two checks per drop, no waiter re-checking
        await indexed.drop_toggle(objects[-1])
        await asyncio.wait_for(asyncio.gather(*waiters), timeout=5)
        # a member turning on or off still wakes the waiters (kopf's own Toggle.turn_to)
        resource = await indexed.make_toggle(name="resource")
        waiting = asyncio.create_task(indexed.wait_for(True))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await resource.turn_to(True)
        await asyncio.wait_for(waiting, timeout=5)

    asyncio.run(scenario())
