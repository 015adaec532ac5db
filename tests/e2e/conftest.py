"""Fixtures for end-to-end training runs on tiny, locally built models."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmforge.trainer import checkpoints

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


def _lmforge_command(*args: str) -> tuple[list[str], dict[str, str]]:
    exe = shutil.which("lmforge", path=str(Path(sys.executable).parent)) or "lmforge"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return [exe, *args], env


def lmforge(
    *args: str, cwd: Path, timeout: float = 600, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run the real `lmforge` console script."""
    command, env = _lmforge_command(*args)
    return subprocess.run(
        command, cwd=cwd, text=True, capture_output=True, timeout=timeout, env=env, **kw
    )


def kill_at_checkpoint(
    job: Path,
    *run_args: str,
    checkpoint_dir: Path,
    cwd: Path,
    at_least: int = 0,
    timeout: float = 600,
) -> int:
    """`lmforge run job *run_args`, SIGKILLed with every process under it, as a node failure
    would, once `checkpoint_dir` holds a complete checkpoint of step (or round) `at_least`
    or later. Returns the newest complete checkpoint's step after the kill; fails if none
    was written or the run finished first."""
    command, env = _lmforge_command("run", str(job), *run_args)
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        latest = checkpoints.latest_complete_checkpoint(checkpoint_dir)
        if latest is not None and (checkpoints.checkpoint_step(latest) or 0) >= at_least:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself ({proc.returncode})"
    latest = checkpoints.latest_complete_checkpoint(checkpoint_dir)
    assert latest is not None, "no checkpoint was written before the deadline"
    step = checkpoints.checkpoint_step(latest)
    assert step is not None
    return step
