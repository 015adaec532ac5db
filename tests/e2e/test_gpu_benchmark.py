"""`make bench-gpu`'s training benchmark, its plumbing checked where there is no GPU: both
trainers (`lmforge run` and TRL's SFTTrainer) run a few steps of a tiny model on the CPU
through the same code the GPU run takes, and the report holds what the GPU run reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_both_trainers_run_and_are_compared(tmp_path: Path) -> None:
    from benchmarks import gpu_training

    out = tmp_path / "gpu_training.json"
    args = ["--cpu", "--steps", "4", "--warmup", "1", "--records", "32", "--out", str(out)]
    args.append("--profile")
    assert gpu_training.main(args) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["gpu"] == "cpu" and report["machine"]["peak_bf16_flops"] is None
    smoke = report["workloads"]["smoke"]
    assert 0 < smoke["attention_length"] <= gpu_training.SMOKE["seq"]
    for trainer in ("lmforge", "trl"):
        run = smoke[trainer]
        assert run["steps"] == 4 and run["steps_timed"] == 2
        assert run["real_tokens_per_batch"] > 0 and run["tokens_per_second_per_gpu"] > 0
        assert run["mfu"] is None  # no peak FLOP/s to divide by on a CPU
        assert run["peak_gpu_memory_bytes"] is None
        # Where the profiled steps' time went (operators here, kernels on a GPU).
        profile = run["profile"]
        assert profile["steps_profiled"] == 2 and profile["busy_seconds_per_step"] > 0
        assert sum(profile["categories"].values()) == pytest.approx(1, abs=1e-3)
        assert profile["categories"]["matmul"] > 0 and len(profile["top"]) == 12
    # The pre-flight estimate, to compare with the peak on a GPU (here: per CPU process).
    assert smoke["lmforge"]["estimated_gpu_memory_bytes"] > 0
    assert math.isfinite(smoke["ratio_to_trl"]) and smoke["ratio_to_trl"] > 0


def test_a_cpu_run_never_writes_the_gpu_results() -> None:
    from benchmarks import gpu_training

    with pytest.raises(SystemExit):
        gpu_training.main(["--cpu"])


def test_one_workload_run_keeps_the_other_from_the_same_gpu(tmp_path: Path) -> None:
    """`--only lora` after `--only full` (one device command each) leaves both in the file,
    each with its own date and command; a file from another GPU or software is not mixed in."""
    from benchmarks.gpu_training import keep_earlier_workloads

    machine = {"gpu": "H100", "gpus": 1, "versions": {"torch": "2.11"}, "platform": "a"}
    earlier = {"date": "d1", "command": "c1", "machine": machine, "workloads": {"full": {}}}
    out = tmp_path / "gpu_training.json"
    out.write_text(json.dumps(earlier))

    def now(**changes: object) -> dict:
        return {"machine": {**machine, "platform": "b", **changes}, "workloads": {"lora": {}}}

    report = now()
    assert keep_earlier_workloads(report, out) == ["full"]
    assert report["workloads"] == {"lora": {}, "full": {"date": "d1", "command": "c1"}}
    assert keep_earlier_workloads(now(versions={"torch": "2.15"}), out) == []
    assert keep_earlier_workloads(now(gpu="H200"), out) == []
    assert keep_earlier_workloads(now(), tmp_path / "absent.json") == []
