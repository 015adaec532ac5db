"""A real Prometheus (Debian's package) scrapes the operator and a training run; the
alert rules load and evaluate on that data, and every Grafana dashboard query returns
series. Prometheus listens on 127.0.0.1 and scrapes only 127.0.0.1 targets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dashboard_preview  # hack/, on sys.path through tests/conftest.py
import pytest
import yaml

from tests.integration.conftest import OperatorProcess, wait_for
from tests.kube import Kube
from tests.prometheus import RULES, Prometheus, Target, free_port, running_prometheus

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts/lmforge/files/dashboards/lmforge.json"
DATA = ROOT / "examples/data"


@pytest.fixture
def trainer_port() -> int:
    return free_port()


@pytest.fixture
def prometheus(
    operator: OperatorProcess, trainer_port: int, tmp_path: Path
) -> Iterator[Prometheus]:
    targets = [Target("lmforge-operator", operator.port), Target("trainer", trainer_port)]
    with running_prometheus(targets, tmp_path / "prometheus") as prom:
        yield prom


def training_run(tiny_model: Path, tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    job = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": "scraped"},
        "spec": {
            "model": {"source": f"file://{tiny_model}"},
            "dataset": {
                "sources": [{"uri": str(DATA / "tiny-task-train.jsonl"), "format": "openai"}],
                "maxSeqLength": 64,
            },
            "distributed": {"gpusPerNode": 0},
            # Long enough to be scraped while it runs; the test stops it.
            "training": {"maxSteps": 5000, "batchSize": {"perDevice": 4}, "loggingEverySteps": 1},
        },
    }
    path = tmp_path / "scraped.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "lmforge"),
            "run",
            str(path),
            "--output",
            str(tmp_path / "out"),
            "--metrics-port",
            str(port),
        ],
        env=env,
        stdout=open(tmp_path / "trainer.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_dashboard_queries_return_data_from_a_real_scrape(
    crds: Kube,
    operator: OperatorProcess,
    prometheus: Prometheus,
    trainer_port: int,
    tiny_model: Path,
    namespace: str,
    tmp_path: Path,
) -> None:
    started = time.time()
    crds.apply(
        {
            "apiVersion": "lmforge.io/v1alpha1",
            "kind": "FinetuneJob",
            "metadata": {"name": "watched", "namespace": namespace},
            "spec": {
                "model": {"source": "hf://org/base-model"},
                "dataset": {"sources": [{"uri": "hf://org/dataset"}]},
                "distributed": {"gpusPerNode": 1},
            },
        }
    )
    # A service whose adapter the job trains: its phase and adapter state are the
    # operator's series on the dashboard's Serving row.
    crds.apply(
        {
            "apiVersion": "lmforge.io/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": "chat", "namespace": namespace},
            "spec": {
                "model": {"source": "hf://org/base-model"},
                "adapters": [{"name": "tuned", "fromJob": {"name": "watched"}}],
            },
        }
    )
    trainer = training_run(tiny_model, tmp_path, trainer_port)
    try:
        # Scraped while training: several samples of the step, moving.
        wait_for(
            lambda: (
                (r := prometheus.api("query", query="max(lmforge_train_step)")["result"])
                and float(r[0]["value"][1]) >= 3
                and prometheus.api("query", query="changes(lmforge_train_step[1m])")["result"]
            ),
            "the trainer's step scraped while training",
            timeout=300,
            interval=1,
        )
        proc = crds.run(
            "wait",
            "-n",
            namespace,
            "--for=condition=Succeeded",
            "finetunejob/watched",
            "--timeout=90s",
        )
        assert proc.returncode == 0, proc.stderr
        time.sleep(5)  # a few scrapes after the job finished
    finally:
        os.killpg(trainer.pid, signal.SIGTERM)
        trainer.wait(timeout=60)

    targets = prometheus.api("targets")["activeTargets"]
    assert {t["labels"]["job"] for t in targets} == {"lmforge-operator", "trainer"}
    assert all(t["scrapeUrl"].startswith("http://127.0.0.1:") for t in targets)

    end = time.time()
    # The serving engine's panels are checked against a real engine (tests/serve).
    panels = dashboard_preview.evaluate(prometheus.base, started, end, engine=False)
    assert len(panels) >= 16
    empty = [(p.title, p.query) for p in panels if not any(v for _, _, v in p.series)]
    assert empty == [], "dashboard panels without data"
    # The preview committed under docs/ is drawn from such a run (LMFORGE_PREVIEW=path).
    preview = Path(os.environ.get("LMFORGE_PREVIEW") or tmp_path / "preview.png")
    dashboard_preview.draw(panels, preview, "the operator and a tiny training run")
    assert preview.stat().st_size > 10_000

    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric, label = variable["query"]["query"][len("label_values(") : -1].rsplit(", ", 1)
            values = prometheus.api(
                f"label/{label}/values",
                **{
                    "match[]": dashboard_preview.as_grafana_would(metric, 60),
                    "start": started,
                    "end": end,
                },
            )
            assert namespace in values or "watched" in values, (variable["name"], values)

    groups = prometheus.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
