"""Peak GPU memory per distributed strategy on a ~1B Llama (random weights), one GPU.

    make bench-gpu            # or: .venv/bin/python benchmarks/gpu_strategies.py

For each of ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload (full fine-tuning) and QLoRA in
4 and 8 bits (bitsandbytes), through the real `lmforge run`: train 4 steps with a
checkpoint at step 2, then rerun to 6 steps, which must resume from the last
checkpoint. Writes benchmarks/results/gpu-strategies.json and .md with the peak
memory (torch.cuda.max_memory_allocated of rank 0), the loss and the wall time.
Needs a CUDA GPU; the tiny tokenizer is built locally, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
# TinyLlama-1.1B's shape (vocabulary from the local tokenizer): ~1.0B parameters.
SHAPE = {"hidden_size": 2048, "num_layers": 22, "num_heads": 32, "intermediate_size": 5632}
RUNS: dict[str, dict[str, Any]] = {
    "zero2": {"method": {"type": "full"}, "distributed": {"strategy": "zero2"}},
    "zero3": {"method": {"type": "full"}, "distributed": {"strategy": "zero3"}},
    "zero3-offload": {"method": {"type": "full"}, "distributed": {"strategy": "zero3-offload"}},
    "qlora-4bit": {"method": {"type": "qlora", "quantization": {"bits": 4}}},
    "qlora-8bit": {"method": {"type": "qlora", "quantization": {"bits": 8}}},
}


def build_model(folder: Path) -> Path:
    from lmforge.trainer.tiny import build_tiny_model

    if not (folder / "config.json").exists():
        build_tiny_model(folder, max_position_embeddings=512, **SHAPE)
    return folder


def job(name: str, model: Path, steps: int, changes: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"source": f"file://{model}"},
        "dataset": {
            "sources": [{"uri": str(DATA / "tiny-task-train.jsonl"), "format": "openai"}],
            "evalSplit": {"sources": []},
            "maxSeqLength": 256,
        },
        "distributed": {"gpusPerNode": 1},
        "training": {
            "maxSteps": steps,
            "batchSize": {"perDevice": 4},
            "precision": "bf16",
            "gradientCheckpointing": True,
            "loggingEverySteps": 1,
        },
        "checkpoint": {"everySteps": 2, "keep": 2},
    }
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value}
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def run(name: str, model: Path, work: Path, changes: dict[str, Any]) -> dict[str, Any]:
    out = work / name
    # The CLI as its console script runs it, found without the script (an environment
    # may have the package on its path and no `lmforge` in bin/).
    lmforge = [sys.executable, "-m", "lmforge.cli"]
    results = []
    for steps in (4, 6):  # the second run resumes from the first one's checkpoint
        path = work / f"{name}-{steps}.yaml"
        path.write_text(yaml.safe_dump(job(name, model, steps, changes), sort_keys=False))
        started = time.monotonic()
        proc = subprocess.run(
            [*lmforge, "run", str(path), "--output", str(out)],
            capture_output=True,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        if proc.returncode != 0:
            return {"ok": False, "error": proc.stderr[-2000:]}
        metrics = json.loads((out / "metrics.json").read_text())
        results.append((metrics, round(time.monotonic() - started, 1)))
    (first, first_s), (second, second_s) = results
    return {
        "ok": second["resumed_from_step"] == 4 and second["steps"] == 6,
        "strategy": second.get("strategy"),
        "peak_gpu_memory_gib": round(max(first["peak_memory_bytes"], 0) / 2**30, 2),
        "peak_gpu_memory_gib_resumed": round(second["peak_memory_bytes"] / 2**30, 2),
        "train_loss": first["train_loss"],
        "resumed_from_step": second["resumed_from_step"],
        "trainable_parameters": first["trainable_parameters"],
        "total_parameters": first["total_parameters"],
        "wall_seconds": [first_s, second_s],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / ".lmforge" / "bench-gpu")
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), default=sorted(RUNS))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.work / "llama-1b")
    results = {name: run(name, model, args.work, RUNS[name]) for name in args.only}
    report = {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": SHAPE,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-strategies.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Peak GPU memory per strategy ({report['gpu']}, ~1B Llama, batch 4 x 256, bf16)",
        "",
        "| run | peak GiB | loss | resumed | wall s (4 steps, +2 resumed) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        if not r["ok"]:
            lines.append(f"| {name} | failed | | | |")
            continue
        lines.append(
            f"| {name} | {r['peak_gpu_memory_gib']} | {r['train_loss']:.3f} | "
            f"step {r['resumed_from_step']} | {r['wall_seconds']} |"
        )
    (args.out / "gpu-strategies.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
