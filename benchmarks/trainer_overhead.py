"""Benchmark: what `lmforge run` costs per training step over a plain transformers Trainer.

In one run, on the same tiny Llama-architecture model (built locally) and the same demo data
(examples/data/tiny-task-train.jsonl, the "spell the digits" task), LoRA rank 16 on every
linear layer, batch 32, 64 tokens at most:

- lmforge: the trainer process `lmforge run` starts (`python -m lmforge.trainer run` on the
  run config `lmforge run` writes), packing off, so that its batches match the baseline's;
- baseline: a plain loop anyone would write: `apply_chat_template`, `DataCollatorForSeq2Seq`,
  peft's `get_peft_model`, `transformers.Trainer`;
- lmforge with packing on: packing efficiency (real tokens / all tokens in the batches).

Each configuration runs in its own process. lmforge and the baseline run side by side,
each pinned to its own core (swapped every repeat), and start timing together once both
have done `--warmup` steps: on a VM whose speed drifts by +-20 % from minute to minute, only
runs over the same seconds compare. Step time is the median time between `on_step_end`
callbacks (the same timing callback is added to both trainers, and a wrapper around the data
collator counts tokens); the ratio is the median of the `--repeats` pairs' ratios.

    python -m benchmarks.trainer_overhead
    python -m benchmarks.trainer_overhead --steps 80 --repeats 3

Prints a table and writes benchmarks/results/trainer_overhead.json. Not a test: compare the
ratio within one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import header, machine, publish

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "trainer_overhead.json"
DATA = ROOT / "examples" / "data" / "tiny-task-train.jsonl"
BATCH, MAX_LENGTH, RANK, ALPHA, LR = 32, 64, 16, 32, 3e-3


def job_yaml(model: Path, steps: int, packing: bool) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": "overhead"},
        "spec": {
            "model": {"source": f"file://{model}", "chatTemplate": "chatml"},
            "dataset": {
                "sources": [{"uri": str(DATA), "format": "openai"}],
                "maxSeqLength": MAX_LENGTH,
                "packing": packing,
            },
            "method": {
                "type": "lora",
                "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0},
            },
            "training": {
                "maxSteps": steps,
                "learningRate": LR,
                "batchSize": {"perDevice": BATCH},
                "loggingEverySteps": 10,
            },
            "distributed": {"gpusPerNode": 0},
            "checkpoint": {"everySteps": steps * 10},
            "evaluation": {"metric": "none"},
        },
    }


# ---------------------------------------------------------------- inside a measured process


class Measure:
    """A step timer callback and a token-counting collator wrapper, for any Trainer."""

    def __init__(self, warmup: int, barrier: Path | None = None, name: str = "") -> None:
        self.warmup, self.barrier, self.name = warmup, barrier, name
        self.step_ends: list[float] = []
        self.real_tokens = 0
        self.all_tokens = 0
        self.batches = 0

    def install(self) -> None:
        import transformers

        measure = self
        original = transformers.Trainer.__init__

        class StepTimer(transformers.TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if len(measure.step_ends) == measure.warmup:
                    measure.wait_for_the_others()
                measure.step_ends.append(time.perf_counter())

        def counting(collate: Any) -> Any:
            def collate_counted(features: Any) -> Any:
                batch = collate(features)
                measure.real_tokens += sum(len(f["input_ids"]) for f in features)
                measure.all_tokens += int(batch["input_ids"].numel())
                measure.batches += 1
                return batch

            return collate_counted

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), StepTimer()]
            if kwargs.get("data_collator") is not None:
                kwargs["data_collator"] = counting(kwargs["data_collator"])
            original(self, *args, **kwargs)

        transformers.Trainer.__init__ = init  # type: ignore[method-assign]

    def wait_for_the_others(self, parties: int = 2, timeout: float = 600) -> None:
        """Runs measured together start timing together: whatever the machine does
        meanwhile (other tenants, clock changes) then falls on both alike."""
        if self.barrier is None:
            return
        (self.barrier / self.name).touch()
        deadline = time.monotonic() + timeout
        while len(list(self.barrier.iterdir())) < parties:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the other run never reached step {self.warmup}")
            time.sleep(0.01)

    def result(self) -> dict[str, Any]:
        gaps = [b - a for a, b in itertools.pairwise(self.step_ends[self.warmup :])]
        return {
            "steps_timed": len(gaps),
            "step_seconds_median": statistics.median(gaps),
            "step_seconds_mean": statistics.fmean(gaps),
            "packing_efficiency": self.real_tokens / max(self.all_tokens, 1),
            "batches": self.batches,
            "real_tokens_per_batch": self.real_tokens / max(self.batches, 1),
            "all_tokens_per_batch": self.all_tokens / max(self.batches, 1),
        }


def worker_lmforge(model: Path, steps: int, packing: bool, out: Path) -> None:
    """The trainer process of `lmforge run`, with the measuring hooks."""
    import yaml

    from lmforge.api.kinds import TrainingJob
    from lmforge.api.validation import load_file
    from lmforge.local import local_run_config

    path = out / "job.yaml"
    path.write_text(yaml.safe_dump(job_yaml(model, steps, packing)))
    (job,) = load_file(path)
    assert isinstance(job, TrainingJob)
    config = local_run_config(job, path, out / "run", out)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    config.dump(config.output_dir / "run.json")
    from lmforge.trainer.__main__ import main as trainer_main

    trainer_main(["run", "--config", str(config.output_dir / "run.json")])


def worker_baseline(model: Path, steps: int, out: Path) -> None:
    """A plain transformers + peft loop on the same model and data."""
    import torch
    from datasets import load_dataset
    from lmforge.trainer.data.templates import NAMED_TEMPLATES
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = NAMED_TEMPLATES["chatml"]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def encode(record: dict[str, Any]) -> dict[str, Any]:
        text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:MAX_LENGTH]
        return {"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)}

    data = load_dataset("json", data_files=str(DATA), split="train")
    data = data.map(encode, remove_columns=data.column_names)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lm = get_peft_model(
        lm,
        LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"),
    )
    args = TrainingArguments(
        output_dir=str(out / "baseline"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    Trainer(model=lm, args=args, train_dataset=data, data_collator=collator).train()


def worker(args: argparse.Namespace) -> None:
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    import torch

    torch.set_num_threads(args.threads)
    barrier = Path(args.barrier) if args.barrier else None
    measure = Measure(args.warmup, barrier, args.worker)
    measure.install()
    out = Path(args.out)
    if args.worker == "baseline":
        worker_baseline(Path(args.model), args.steps, out)
    else:
        worker_lmforge(Path(args.model), args.steps, args.worker == "lmforge-packed", out)
    (out / "measure.json").write_text(json.dumps(measure.result()))


# ---------------------------------------------------------------- the benchmark


def measure_together(
    kinds: dict[str, int | None], model: Path, args: argparse.Namespace, folder: Path
) -> dict[str, dict[str, Any]]:
    """Each kind in its own process, all at once (each pinned to its core, when given), timed
    from the moment all of them finished warming up."""
    barrier = Path(tempfile.mkdtemp(prefix="barrier-", dir=folder))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    procs = {}
    for kind, cpu in kinds.items():
        out = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=folder))
        command = [sys.executable, "-m", "benchmarks.trainer_overhead", "--worker", kind]
        command += ["--model", str(model), "--out", str(out), "--steps", str(args.steps)]
        command += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
        if len(kinds) > 1:
            command += ["--barrier", str(barrier)]
        if cpu is not None:
            command += ["--cpu", str(cpu)]
        log = (out / "log").open("wb")
        procs[kind] = (out, subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log))
    results = {}
    for kind, (out, proc) in procs.items():
        if proc.wait() != 0:
            tail = (out / "log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{kind} failed:\n{tail}")
        results[kind] = dict(json.loads((out / "measure.json").read_text()))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--worker", choices=["lmforge", "lmforge-packed", "baseline"])
    parser.add_argument("--model")
    parser.add_argument("--barrier", help="(worker) folder where the runs measured together meet")
    parser.add_argument("--cpu", type=int, help="(worker) the core to run on")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import peft
    import torch
    import transformers
    from lmforge.trainer.tiny import build_tiny_model

    info = machine(
        torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__
    )
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        folder = Path(tmp)
        model = build_tiny_model(folder / "tiny-llama")
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "lmforge": []}
        cores = sorted(os.sched_getaffinity(0))
        for i in range(args.repeats):
            # side by side, each on its own core, swapping cores every repeat
            pinned = cores[:2] if i % 2 == 0 else cores[1::-1]
            placement = dict(zip(("baseline", "lmforge"), pinned, strict=False))
            print(f"run {i + 1}/{args.repeats}: baseline and lmforge together ...", flush=True)
            together = measure_together(
                {kind: placement.get(kind) for kind in runs}, model, args, folder
            )
            for kind, result in together.items():
                runs[kind].append(result)
        print("lmforge with packing ...", flush=True)
        packed = measure_together({"lmforge-packed": None}, model, args, folder)["lmforge-packed"]

    def median_step(kind: str) -> float:
        return statistics.median(r["step_seconds_median"] for r in runs[kind])

    # Each pair ran side by side over the same seconds: the ratio within a pair is free of
    # the machine's drift from one minute to the next (on this VM, +-20 %).
    pair_ratios = [
        lm["step_seconds_median"] / base["step_seconds_median"]
        for lm, base in zip(runs["lmforge"], runs["baseline"], strict=True)
    ]
    ratio = statistics.median(pair_ratios)
    report = {
        **header(
            "trainer_overhead",
            [f"--steps {args.steps}", f"--repeats {args.repeats}", f"--threads {args.threads}"],
        ),
        "machine": info,
        "setup": {"batch": BATCH, "max_seq_length": MAX_LENGTH, "lora_rank": RANK},
        "runs": runs,
        "packed": packed,
        "step_time_ratio": ratio,
        "step_time_ratio_per_pair": pair_ratios,
        "packing_efficiency": packed["packing_efficiency"],
        "baseline_padding_efficiency": runs["baseline"][0]["packing_efficiency"],
        "goals": {"step_time_ratio": 1.05, "packing_efficiency": 0.95},
    }
    rows = [
        ("baseline step (ms, median)", f"{1000 * median_step('baseline'):.1f}"),
        ("lmforge step (ms, median)", f"{1000 * median_step('lmforge'):.1f}"),
        ("  ratio, median of the pairs (goal <= 1.05)", f"{ratio:.3f}"),
        (
            "  pairs from / to (each in the results file)",
            f"{min(pair_ratios):.3f} / {max(pair_ratios):.3f}",
        ),
        ("lmforge packed step (ms)", f"{1000 * packed['step_seconds_median']:.1f}"),
        ("packing efficiency (goal >= 95 %)", f"{100 * packed['packing_efficiency']:.1f} %"),
        (
            "unpacked real/all tokens (baseline)",
            f"{100 * report['baseline_padding_efficiency']:.1f} %",
        ),
    ]
    publish(report, Path(args.out), "trainer_overhead", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
