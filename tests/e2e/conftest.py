"""Fixtures for end-to-end training runs on tiny, locally built models."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


JOB: dict[str, Any] = {
    "apiVersion": "lmforge.io/v1alpha1",
    "kind": "FinetuneJob",
    "metadata": {"name": "e2e"},
    "spec": {
        "dataset": {
            "sources": [{"uri": str(DATA / "tiny-task-train.jsonl"), "format": "openai"}],
            "evalSplit": {"sources": [{"uri": str(DATA / "tiny-task-eval.jsonl")}]},
            "maxSeqLength": 64,
        },
        "distributed": {"gpusPerNode": 0},
        "training": {"maxSteps": 4, "batchSize": {"perDevice": 8}, "loggingEverySteps": 1},
    },
}


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def write_job(tmp_path: Path, tiny_model: Path) -> Callable[..., Path]:
    """Write a FinetuneJob YAML for the tiny model; keyword args merge into spec."""

    def write(name: str = "e2e", **spec: Any) -> Path:
        job = _merge(JOB, {"metadata": {"name": name}, "spec": spec})
        job["spec"].setdefault("model", {"source": f"file://{tiny_model}"})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job, sort_keys=False))
        return path

    return write


def lmforge(
    *args: str, cwd: Path, timeout: float = 600, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run the real `lmforge` console script."""
    exe = shutil.which("lmforge", path=str(Path(sys.executable).parent)) or "lmforge"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [exe, *args], cwd=cwd, text=True, capture_output=True, timeout=timeout, env=env, **kw
    )
