"""The contract: the run config the operator renders in the cluster trains a model as is.

The operator renders the ConfigMap and the Job; this test plays the kubelet: it
mounts the volumes (maps the pod's mount paths to local folders), sets the
environment the Job's pod template declares, and runs the trainer's entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.api.runconfig import RunConfig
from tests.integration.conftest import OperatorProcess, wait_for
from tests.kube import Kube

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_operator_rendered_config_trains_locally(
    crds: Kube, operator: OperatorProcess, namespace: str, tiny_model: Path, tmp_path: Path
) -> None:
    crds.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": namespace},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }
            for claim in ("models", "data")
        ]
    )
    crds.apply(
        {
            "apiVersion": "lmforge.io/v1alpha1",
            "kind": "FinetuneJob",
            "metadata": {"name": "contract", "labels": {"lmforge.io/kwok-hold": "true"}},
            "spec": {
                "model": {"source": "pvc://models/tiny-llama"},
                "dataset": {
                    "sources": [{"uri": "pvc://data/tiny-task-train.jsonl", "format": "openai"}],
                    "evalSplit": {"sources": [{"uri": "pvc://data/tiny-task-eval.jsonl"}]},
                    "maxSeqLength": 64,
                },
                "method": {"type": "lora", "lora": {"dropout": 0.0}},
                "training": {"maxSteps": 300, "learningRate": 3e-3, "batchSize": {"perDevice": 32}},
                "distributed": {"gpusPerNode": 0},
                "checkpoint": {"everySteps": 100},
                "evaluation": {"metric": "exact-match", "maxNewTokens": 16},
            },
        },
        "-n",
        namespace,
    )
    config_map = wait_for(
        lambda: (
            crds.run(
                "get", "configmap", "contract-run-config", "-n", namespace, "-o", "json"
            ).returncode
            == 0
            and crds.get("configmap", "contract-run-config", "-n", namespace)
        ),
        "the run config",
    )
    rendered = RunConfig.model_validate(json.loads(config_map["data"]["run.json"]))
    assert rendered.paths.model == "/mnt/pvc/models/tiny-llama"
    assert rendered.paths.output == "/mnt/output/finetunejob/contract"

    # Play the kubelet: the pod's volumes, then the Job's declared environment.
    mounts = {
        "/mnt/pvc/models": str(tiny_model.parent),
        "/mnt/pvc/data": str(ROOT / "examples" / "data"),
        "/mnt/output": str(tmp_path / "output"),
    }
    text = config_map["data"]["run.json"]
    for inside, outside in mounts.items():
        text = text.replace(f'"{inside}/', f'"{outside}/')
    config_path = tmp_path / "run.json"
    config_path.write_text(text)
    pod = crds.get("job", "contract-0", "-n", namespace)["spec"]["template"]["spec"]
    (trainer,) = pod["containers"]
    assert trainer["command"][-1] == "/etc/lmforge/run.json"
    env = {e["name"]: e["value"] for e in trainer["env"] if "value" in e}
    env |= {
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, *trainer["command"][1:-1], str(config_path)],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "output" / "finetunejob" / "contract"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 300
    assert metrics["exact_match"] > metrics["exact_match_before"]
    assert (out / "final" / "adapter_model.safetensors").exists()
