"""Crash recovery and multi-process training, through the real entry points."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from lmforge.trainer import checkpoints

from lmforge.api.validation import load_file
from lmforge.local import local_run_config
from tests.e2e.conftest import kill_at_checkpoint, lmforge

pytestmark = pytest.mark.slow
NO_EVAL = {"evalSplit": {"sources": []}}


def test_sigkill_then_resume_auto(write_job: Callable[..., Path], tmp_path: Path) -> None:
    path = write_job(
        "resume",
        dataset=NO_EVAL,
        training={"maxSteps": 40, "batchSize": {"perDevice": 8}},
        checkpoint={"everySteps": 5, "keep": 2},
    )
    out = tmp_path / "out"
    ckpts = out / "checkpoints"
    killed_at = kill_at_checkpoint(
        path, "--output", str(out), checkpoint_dir=ckpts, cwd=tmp_path, at_least=10, timeout=300
    )
    assert killed_at < 40

    # A checkpoint damaged after the fact must be skipped, not resumed from.
    damaged = ckpts / "checkpoint-999"
    shutil.copytree(ckpts / f"checkpoint-{killed_at}", damaged)
    weights = next(damaged.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])

    rerun = lmforge("run", str(path), "--output", str(out), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == killed_at
    assert metrics["steps"] == 40
    assert "skipping incomplete checkpoint" in rerun.stderr and "checkpoint-999" in rerun.stderr


def test_ddp_two_cpu_processes(write_job: Callable[..., Path], tmp_path: Path) -> None:
    path = write_job(
        "ddp",
        dataset=NO_EVAL,
        distributed={"gpusPerNode": 0, "processesPerNode": 2},
        training={"maxSteps": 4, "batchSize": {"perDevice": 4, "global": 16}},
    )
    out = tmp_path / "out"
    proc = lmforge("run", str(path), "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    run = json.loads((out / "run.json").read_text())
    assert run["spec"]["training"]["batchSize"] == {"perDevice": 4, "global": 16}
    assert (out / "final" / "adapter_model.safetensors").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("strategy", ["auto", "fsdp"])
def test_two_nodes_on_localhost(
    strategy: str, write_job: Callable[..., Path], tmp_path: Path
) -> None:
    """Two 'pods' started the way the operator starts them: the torchrun environment only."""
    path = write_job(
        "twonode",
        dataset=NO_EVAL,
        method={"type": "full"},
        distributed={"nodes": 2, "gpusPerNode": 0, "processesPerNode": 1, "strategy": strategy},
        training={"maxSteps": 3, "batchSize": {"perDevice": 4}},
        checkpoint={"everySteps": 3},
    )
    (job,) = load_file(path)
    config = local_run_config(job, path, tmp_path / "out", tmp_path / "runs")
    config.output_dir.mkdir(parents=True)
    config_path = tmp_path / "run.json"
    config.dump(config_path)
    port = _free_port()
    nodes = []
    for rank in range(2):
        env = {
            **os.environ,
            "NNODES": "2",
            "NODE_RANK": str(rank),
            "NPROC_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        nodes.append(
            subprocess.Popen(
                [sys.executable, "-m", "lmforge.trainer", "run", "--config", str(config_path)],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    metrics = json.loads((config.output_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    assert metrics["strategy"] == ("ddp" if strategy == "auto" else strategy)
    checkpoint = config.output_dir / "checkpoints" / "checkpoint-3"
    assert checkpoints.is_complete(checkpoint)
    if strategy == "fsdp":  # each node wrote its own shard into the shared output
        assert len(list(checkpoint.glob("pytorch_model_fsdp_0/*.distcp"))) == 2


def test_bad_data_is_reported_before_training(
    write_job: Callable[..., Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "h"}, {"role": "assistant", "content": "y"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}\n'
        '{"messages": "not a list"}\n'
    )
    # Two processes: the torchrun path, where the worker's exit code must survive torchrun.
    path = write_job(
        "bad",
        dataset={"sources": [{"uri": str(bad), "format": "openai"}], "evalSplit": {"sources": []}},
        distributed={"gpusPerNode": 0, "processesPerNode": 2},
    )
    proc = lmforge("run", str(path), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "bad.jsonl:line 2: field 'messages[1].role'" in proc.stderr
    assert "bad.jsonl:line 3: field 'messages'" in proc.stderr
    assert "failed (exit code 3)" in proc.stderr  # EXIT_BAD_DATA, through torchrun
    assert proc.stderr.count("problems in the training data") == 1  # rank 0 reports, once
    assert not (tmp_path / "out" / "checkpoints").exists()
