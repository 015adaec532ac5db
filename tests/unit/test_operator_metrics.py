"""The operator's per-object series: one current phase / adapter state each, gone with
the object (a deleted Failed job must not keep an alert firing)."""

from __future__ import annotations

from lmforge.operator.main import Dispatch
from lmforge.operator.metrics import OperatorMetrics
from lmforge.operator.settings import OperatorSettings


def series(metrics: OperatorMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name
    }


def test_adapter_states_replace_each_other_and_go_with_the_service() -> None:
    metrics = OperatorMetrics()
    metrics.record_adapters("ml", "chat", {"a": "Loading", "b": "Failed"})
    metrics.record_adapters("ml", "chat", {"a": "Loaded"})
    metrics.record_adapters("ml", "other", {"a": "Pending"})
    states = {
        (dict(k)["job_name"], dict(k)["adapter"], dict(k)["state"])
        for k in series(metrics, "lmforge_adapter_state")
    }
    assert states == {("chat", "a", "Loaded"), ("other", "a", "Pending")}
    metrics.record_phase("InferenceService", "ml", "chat", "Ready")
    metrics.forget("InferenceService", "ml", "chat")
    states = {
        (dict(k)["job_name"], dict(k)["adapter"]) for k in series(metrics, "lmforge_adapter_state")
    }
    assert states == {("other", "a")}


def test_services_are_counted_by_their_own_phases() -> None:
    metrics = OperatorMetrics()
    metrics.record_phase("InferenceService", "ml", "chat", "Degraded")
    metrics.record_phase("FinetuneJob", "ml", "ft", "Running")
    counts = {
        (dict(k)["kind"], dict(k)["phase"]): v for k, v in series(metrics, "lmforge_jobs").items()
    }
    assert counts[("InferenceService", "Degraded")] == 1
    assert counts[("InferenceService", "Ready")] == 0
    assert counts[("FinetuneJob", "Running")] == 1
    assert ("InferenceService", "Running") not in counts
    assert ("FinetuneJob", "Ready") not in counts


def test_a_deleted_job_drops_its_phase_series() -> None:
    metrics = OperatorMetrics()
    dispatch = Dispatch(None, OperatorSettings(), metrics)  # type: ignore[arg-type]
    metrics.record_phase("FinetuneJob", "ml", "broken", "Failed")
    assert series(metrics, "lmforge_job_phase")
    dispatch.forget("FinetuneJob", "ml", "broken")
    assert series(metrics, "lmforge_job_phase") == {}
