"""The alert rules shipped in the Helm chart, under Prometheus's own `promtool`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts/lmforge/files/prometheus/alerts.yaml"
RULE_TESTS = ROOT / "tests/fixtures/prometheus/alerts_test.yaml"
FORBIDDEN_LABELS = {"job", "instance"}  # set by Prometheus itself on every scraped series


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool not found: install Debian's 'prometheus' package (make tools)"
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=120, cwd=RULE_TESTS.parent
    )


def alert_names(path: Path) -> set[str]:
    doc = yaml.safe_load(path.read_text())
    return {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_rules_are_valid() -> None:
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_tests_pass() -> None:
    proc = promtool("test", "rules", RULE_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_tested_firing() -> None:
    rules = alert_names(RULES)
    assert rules >= {
        "LMForgeJobFailed",
        "LMForgeJobRestartsRising",
        "LMForgeJobNoProgress",
        "LMForgeJobStuckInitializing",
        "LMForgeJobStuckPending",
        "LMForgeOperatorDown",
        "LMForgeReconcileErrors",
        "LMForgeInferenceServiceNotReady",
        "LMForgeAdapterFailed",
    }
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fired = {
        a["alertname"]
        for t in doc["tests"]
        for a in t.get("alert_rule_test", [])
        if a.get("exp_alerts")
    }
    assert rules - fired == set(), "alerts without a promtool test that fires them"


def test_metric_names_and_labels_follow_prometheus_conventions() -> None:
    """lmforge_ prefix, counters end in _total, and no label Prometheus sets itself
    (a `job` label would be renamed exported_job on scrape)."""
    from lmforge.operator.metrics import OperatorMetrics
    from lmforge.trainer.progress import PrometheusSink

    sink = PrometheusSink(0, "llama", "ml")
    try:
        families = [*OperatorMetrics().registry.collect(), *sink.registry.collect()]
    finally:
        sink.close()
    assert len(families) >= 15
    for family in families:
        assert family.name.startswith("lmforge_"), family.name
        for sample in family.samples:
            assert FORBIDDEN_LABELS.isdisjoint(sample.labels), (family.name, sample.labels)
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
