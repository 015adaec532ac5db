"""Sharded training that really runs on CPU: FSDP over 2 gloo processes, DeepSpeed ZeRO in one.

Every run trains the same tiny model on the same global batch of 12 sequences with a
constant learning rate, so each one must reproduce the per-step losses of one plain
process (the baseline), including across a SIGKILL and a resume into another world size.

Tolerance: FSDP reduce-scatters gradients and DeepSpeed partitions them, so fp32 sums run
in another order than one process's gradient accumulation. That changes results at the
1e-7 relative level per operation; over 12 Adam steps (which normalise by the gradient's
running RMS) it stays well under 1e-4 relative. A real fault (a wrong or repeated batch,
a rank's gradients lost, a step skipped or replayed on resume, an optimizer state not
restored) moves the loss by more than 1e-2 at this learning rate, which the tests also
check the run is sensitive to.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from lmforge.trainer import checkpoints
from safetensors.torch import load_file

from tests.e2e.conftest import DATA, JOB, _merge, lmforge

pytestmark = pytest.mark.slow
RTOL = 1e-4
STEPS = 12
TRAINING = {
    "maxSteps": STEPS,
    "batchSize": {"perDevice": 2, "global": 12},
    "learningRate": 1e-3,
    "scheduler": "constant",
    "loggingEverySteps": 1,
}
FULL = {"type": "full"}
LORA = {"type": "lora", "lora": {"dropout": 0.0}}  # no dropout: ranks draw no random masks


def _write(folder: Path, name: str, model: Path, **spec: Any) -> Path:
    changes = {
        "dataset": {"evalSplit": {"sources": []}},
        "training": TRAINING,
        "checkpoint": {"everySteps": 3, "keep": 5},
        **spec,
    }
    job = _merge(JOB, {"metadata": {"name": name}, "spec": changes})
    job["spec"]["model"] = {"source": f"file://{model}"}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _run(path: Path, out: Path) -> dict[str, Any]:
    proc = lmforge("run", str(path), "--output", str(out), cwd=path.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads((out / "metrics.json").read_text()))


def _losses(out: Path) -> list[float]:
    """Per-step training losses of a finished run (the last checkpoint's history)."""
    last = checkpoints.latest_complete_checkpoint(out / "checkpoints")
    assert last is not None
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    steps = {e["step"]: e["loss"] for e in history if "loss" in e}
    return [steps[s] for s in sorted(steps)]


def _weights(final: Path) -> dict[str, Any]:
    (weights,) = final.glob("*.safetensors")
    return load_file(weights)


def _assert_same_training(run: Path, baseline: Path, steps: int = STEPS) -> None:
    got, want = _losses(run), _losses(baseline)[:steps]
    assert len(got) == steps
    assert got == pytest.approx(want, rel=RTOL)
    # The run is sensitive: the loss moved far more than the tolerance.
    assert max(want) - min(want) > 100 * RTOL * max(want)


def _assert_same_weights(final: Path, baseline: Path) -> None:
    got, want = _weights(final), _weights(baseline)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape, name  # gathered, not one rank's shard
        scale = float(tensor.abs().max()) or 1.0
        assert float((got[name] - tensor).abs().max()) <= 1e-3 * scale, name


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the run and every process under it, as a node failure would: torchrun
    starts its workers in sessions of their own, so killing the group is not enough."""
    tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    for pid in tree[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=30)


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Path]:
    """One plain process per method: the losses and weights every strategy must reproduce."""
    folder = tmp_path_factory.mktemp("baselines")
    outs = {}
    for name, method in (("full", FULL), ("lora", LORA)):
        path = _write(folder, f"single-{name}", tiny_model, method=method)
        metrics = _run(path, folder / name)
        assert metrics["world_size"] == 1 and metrics["strategy"] == "single"
        outs[name] = folder / name
    return outs


def test_fsdp_full_resumes_after_sigkill_into_another_world_size(
    baselines: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    two = _write(
        tmp_path,
        "fsdp2",
        tiny_model,
        method=FULL,
        distributed={"gpusPerNode": 0, "processesPerNode": 2, "strategy": "fsdp"},
    )
    out = tmp_path / "out"
    ckpts = out / "checkpoints"
    exe = str(Path(sys.executable).parent / "lmforge")
    proc = subprocess.Popen(
        [exe, "run", str(two), "--output", str(out)],
        cwd=tmp_path,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoints.latest_complete_checkpoint(ckpts) is not None:
            break
        time.sleep(0.05)
    _kill_tree(proc)
    latest = checkpoints.latest_complete_checkpoint(ckpts)
    assert latest is not None, "no checkpoint was written before the deadline"
    assert not (out / "metrics.json").exists(), "the run finished before it was killed"
    killed_at = checkpoints.checkpoint_step(latest)
    assert killed_at is not None and killed_at < STEPS
    # A sharded checkpoint: one file per rank (torch.distributed.checkpoint), no full copy.
    assert len(list(latest.glob("pytorch_model_fsdp_0/*.distcp"))) == 2
    assert not list(latest.glob("*.safetensors"))

    # The same job on 3 processes (same global batch: 3 x 2 x 2 instead of 2 x 2 x 3)
    # picks up the 2-process shards: DCP reshards on load.
    three = _write(
        tmp_path,
        "fsdp3",
        tiny_model,
        method=FULL,
        distributed={"gpusPerNode": 0, "processesPerNode": 3, "strategy": "fsdp"},
    )
    metrics = _run(three, out)
    assert metrics["resumed_from_step"] == killed_at
    assert metrics["world_size"] == 3 and metrics["strategy"] == "fsdp"
    assert metrics["steps"] == STEPS
    _assert_same_training(out, baselines["full"])
    _assert_same_weights(out / "final", baselines["full"] / "final")


def test_fsdp_lora_matches_one_process(
    baselines: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    path = _write(
        tmp_path,
        "fsdp-lora",
        tiny_model,
        method=LORA,
        distributed={"gpusPerNode": 0, "processesPerNode": 2, "strategy": "fsdp"},
    )
    metrics = _run(path, tmp_path / "out")
    assert metrics["world_size"] == 2 and metrics["strategy"] == "fsdp"
    _assert_same_training(tmp_path / "out", baselines["lora"])
    assert (tmp_path / "out" / "final" / "adapter_config.json").exists()
    _assert_same_weights(tmp_path / "out" / "final", baselines["lora"] / "final")


# An AlignmentJob scores its held-out pairs before and after training and exports final/: under
# FSDP every rank takes part in both (each forward pass and gathering the weights are
# collectives). dpo with full fine-tuning trains against TRL's second copy of the start model,
# sharded as the policy is; the reward model merges its adapter into the sharded model.
ALIGNMENT = {"dpo": FULL, "reward-model": LORA}
ALIGNMENT_STEPS = 6
# The held-out metrics of each method: the two runs must agree on them as on the weights.
HELD_OUT = {
    "dpo": ("eval_pairs", "preference_accuracy", "reward_margin", "likelihood_accuracy"),
    "reward-model": ("pair_accuracy", "pair_accuracy_before"),
}


def _alignment_job(folder: Path, name: str, model: Path, method: str, **spec: Any) -> Path:
    job = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "AlignmentJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": f"file://{model}"},
            "dataset": {
                "sources": [{"uri": str(DATA / "tiny-preferences-train.jsonl")}],
                "evalSplit": {"sources": [{"uri": str(DATA / "tiny-preferences-eval.jsonl")}]},
                "maxSeqLength": 64,
            },
            "method": {"type": method, "peft": ALIGNMENT[method]},
            "training": {
                **TRAINING,
                "maxSteps": ALIGNMENT_STEPS,
                "batchSize": {"perDevice": 2, "global": 8},
            },
            "checkpoint": {"everySteps": 3, "keep": 2},
            **spec,
        },
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


@pytest.mark.parametrize("method", ALIGNMENT)
def test_alignment_under_fsdp_matches_one_process(
    method: str, tiny_model: Path, tmp_path: Path
) -> None:
    one = _alignment_job(tmp_path, f"{method}-one", tiny_model, method)
    two = _alignment_job(
        tmp_path,
        f"{method}-fsdp",
        tiny_model,
        method,
        distributed={"gpusPerNode": 0, "processesPerNode": 2, "strategy": "fsdp"},
    )
    want = _run(one, tmp_path / "one")
    got = _run(two, tmp_path / "two")
    assert got["world_size"] == 2 and got["strategy"] == "fsdp"
    _assert_same_training(tmp_path / "two", tmp_path / "one", steps=ALIGNMENT_STEPS)
    _assert_same_weights(tmp_path / "two" / "final", tmp_path / "one" / "final")
    for name in HELD_OUT[method]:  # every held-out pair scored once, by one rank or the other
        assert got[name] == pytest.approx(want[name], rel=1e-3, abs=1e-3), name


def test_zero3_on_cpu_trains_checkpoints_and_resumes(
    baselines: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    """ZeRO-3 on DeepSpeed's CPU accelerator, one process: its partitioned parameters,
    its own checkpoint format and its consolidated export, against the baseline."""
    out = tmp_path / "out"
    distributed = {"gpusPerNode": 0, "strategy": "zero3"}
    first = _write(
        tmp_path,
        "zero3-a",
        tiny_model,
        method=FULL,
        distributed=distributed,
        training=TRAINING | {"maxSteps": 3},
    )
    assert _run(first, out)["strategy"] == "zero3"
    assert list((out / "checkpoints" / "checkpoint-3").glob("global_step3/*optim_states.pt"))
    second = _write(
        tmp_path,
        "zero3-b",
        tiny_model,
        method=FULL,
        distributed=distributed,
        training=TRAINING | {"maxSteps": 6},
    )
    metrics = _run(second, out)
    assert metrics["resumed_from_step"] == 3 and metrics["steps"] == 6
    _assert_same_training(out, baselines["full"], steps=6)


def test_zero2_on_cpu_matches_one_process(
    baselines: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    path = _write(
        tmp_path,
        "zero2",
        tiny_model,
        method=FULL,
        distributed={"gpusPerNode": 0, "strategy": "zero2"},
        training=TRAINING | {"maxSteps": 6},
    )
    assert _run(path, tmp_path / "out")["strategy"] == "zero2"
    _assert_same_training(tmp_path / "out", baselines["full"], steps=6)


def test_zero_with_two_cpu_processes_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    """The run config can still ask for it (the API refuses it): the trainer says why."""
    job = yaml.safe_load(_write(tmp_path, "z", tiny_model).read_text())
    from lmforge.api.validation import parse_object
    from lmforge.local import local_run_config

    config = local_run_config(parse_object(job), tmp_path / "z.yaml", tmp_path / "out", tmp_path)
    config.spec.distributed.strategy = "zero2"
    config.spec.distributed.processes_per_node = 2
    config.output_dir.mkdir(parents=True)
    config.dump(tmp_path / "run.json")
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.trainer", "run", "--config", str(tmp_path / "run.json")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]  # EXIT_BAD_CONFIG
    assert "without GPUs runs one process only" in proc.stderr
    assert "Traceback" not in proc.stderr
