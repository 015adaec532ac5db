"""`Kube.apply_all`: independent objects applied at once, results in order, failures raised."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from lmforge.operator import kube as kube_module
from lmforge.operator.kube import Kube


def config_map(i: int) -> dict[str, Any]:
    return {"kind": "ConfigMap", "metadata": {"name": f"cm-{i}", "namespace": "ml"}}


class Recorder(Kube):
    """Applies that meet at a barrier: they pass only when all are in flight at once."""

    def __init__(self, parties: int, fail: str | None = None) -> None:
        super().__init__(api=object())  # type: ignore[arg-type]  # no request is made
        self.barrier = threading.Barrier(parties, timeout=5)
        self.fail = fail
        self.threads: set[str] = set()

    def apply(self, obj: dict[str, Any], field_manager: str = "") -> dict[str, Any]:
        self.threads.add(threading.current_thread().name)
        self.barrier.wait()  # BrokenBarrierError after 5 s if the applies ran one by one
        if obj["metadata"]["name"] == self.fail:
            raise ApiException(status=422, reason="Invalid")
        return {**obj, "stored": True}


def test_applies_go_at_once_and_come_back_in_order() -> None:
    objects = [config_map(i) for i in range(6)]
    kube = Recorder(len(objects))
    stored = kube.apply_all(objects)
    assert [o["metadata"]["name"] for o in stored] == [f"cm-{i}" for i in range(6)]
    assert all(o["stored"] for o in stored)
    assert len(kube.threads) == 6


def test_a_failure_is_raised_once_every_apply_ended() -> None:
    objects = [config_map(i) for i in range(4)]
    kube = Recorder(len(objects), fail="cm-2")
    with pytest.raises(ApiException) as err:
        kube.apply_all(objects)
    assert err.value.status == 422
    assert kube.barrier.n_waiting == 0 and not kube.barrier.broken  # all four got there


def test_the_pool_is_bounded_however_many_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_module, "APPLY_THREADS", 2)
    kube = Recorder(2)
    stored = kube.apply_all([config_map(i) for i in range(6)])  # three rounds of two
    assert len(stored) == 6 and len(kube.threads) == 2


def test_one_object_is_applied_in_the_callers_thread() -> None:
    kube = Recorder(1)
    kube.apply_all([config_map(0)])
    assert kube.threads == {threading.current_thread().name}
