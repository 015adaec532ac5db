"""Benchmark (GPU only): training throughput and MFU of `lmforge run` against TRL's SFTTrainer.

Workloads, each on random weights built from a config (no hub access needed), on the same
synthetic chat data (long conversations from the bundled corpus), in one run:

- full: a Llama-architecture ~1.1B model (hidden 2048, 22 layers, 32 heads, 4 KV heads,
  vocab 32000), full fine-tuning in bf16 at sequence length 4096, packing on;
- lora: an 8B-class Llama (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab
  128256), LoRA rank 16 on every linear layer, bf16, sequence length 4096, packing on,
  gradient checkpointing on; lora-no-checkpointing: the same with it off (lmforge's default);
- full-liger and lora-liger: full and lora with Liger's kernels (`training.ligerKernels`).

For each, the trainer process `lmforge run` starts (with the same timing hooks as
benchmarks/trainer_overhead.py) and TRL's `SFTTrainer` with its defaults (plus the same
batch size, sequence length, steps and bf16) on the same data. Reported per configuration:
tokens/s/GPU (real tokens, padding excluded), MFU = (6·N·tokens + attention FLOPs within
each record) / (time · peak bf16 FLOPs of the GPU), and the ratio lmforge / TRL. Goals: MFU
>= 50 % on the 1B full run, >= 1.3x TRL's defaults. lmforge's packed rows go padding-free
through PyTorch's varlen flash kernel (trainer/attention.py).

    python -m benchmarks.gpu_training                       # every workload
    python -m benchmarks.gpu_training --only full --steps 30  # keeps the file's other workload
    python -m benchmarks.gpu_training --cpu --out /tmp/smoke.json   # the plumbing, on a CPU
    python -m benchmarks.gpu_training --only full --profile --out /tmp/profile.json

`--profile` runs the torch profiler over 2 steps after the warm-up in each trainer and
reports where the GPU's time went: the share of a step it was busy, by kind of kernel
(matmul, attention, cross-entropy, optimizer, communication, elementwise and other) and
the top kernels (its timings include the profiler's cost: a file of its own).

Needs one CUDA GPU (H100/H200 class: the 8B LoRA run needs about 40 GB); without one it says
so and exits 0, so that `make bench` passes on CPU machines. Writes
benchmarks/results/gpu_training.json with absolute figures (GPU runs only). `--cpu` runs a
tiny model a few steps through both trainers instead (tests/e2e/test_gpu_benchmark.py): its
figures say nothing of a GPU and never go to the results file.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.report import header, publish

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu_training.json"

# Peak dense bf16 FLOP/s by device name fragment (vendor data sheets, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

WORKLOADS: dict[str, dict[str, Any]] = {
    "full": {
        "config": {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
        },
        "method": {"type": "full"},
        "batch": 4,
        "seq": 4096,
    },
    "lora": {
        "config": {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
        },
        "method": {"type": "lora", "lora": {"rank": 16, "alpha": 32, "dropout": 0.0}},
        # 8B weights and 2 x 4,096 tokens of activations overflow 80 GB without it (measured
        # on an H100); TRL's default turns it on too.
        "training": {"gradientCheckpointing": True},
        "batch": 2,
        "seq": 4096,
    },
}
# The same 8B LoRA run as lmforge's defaults leave it (no gradient checkpointing), now that
# adapter methods keep the frozen base in bf16: `auto`'s estimate says ~65.8 GiB (the fp32
# base needed ~109.6). A workload of its own, so that running out of memory costs only it.
WORKLOADS["lora-no-checkpointing"] = {**WORKLOADS["lora"], "training": {}}
# Each with Liger's kernels (`training.ligerKernels`: fused RMSNorm, RoPE, SwiGLU, and the LM
# head with the cross-entropy in chunks), against the same TRL defaults: what they add is
# this workload's lmforge figures against its plain one's (same GPU, separate commands).
WORKLOADS["full-liger"] = {**WORKLOADS["full"], "training": {"ligerKernels": True}}
WORKLOADS["lora-liger"] = {
    **WORKLOADS["lora"],
    "training": {**WORKLOADS["lora"]["training"], "ligerKernels": True},
}


# The plumbing's own check (`--cpu`, tests/e2e/test_gpu_benchmark.py): both trainers, a
# few steps of a tiny model on the CPU; its figures are not the benchmark's.
SMOKE: dict[str, Any] = {
    "config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
    "method": {"type": "full"},
    "batch": 2,
    "seq": 256,
}


def workload_of(name: str) -> dict[str, Any]:
    return SMOKE if name == "smoke" else WORKLOADS[name]


def build_model(folder: Path, config: dict[str, Any]) -> Path:
    """A random-weight Llama saved in bf16 with the tiny models' tokenizer (ids fit the vocab)."""
    import torch
    from lmforge.trainer.tiny import build_tokenizer, bundled_texts
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(bundled_texts(), vocab_size=512)
    cfg = LlamaConfig(
        **config,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return folder


def write_data(path: Path, records: int, seed: int = 0) -> Path:
    """Chat records of a few hundred to a few thousand tokens, from the bundled corpus."""
    from lmforge.trainer.tiny import bundled_texts

    rng = random.Random(seed)
    sentences = [s for text in bundled_texts() for s in text.split(". ") if s.strip()]
    with path.open("w") as out:
        for _ in range(records):
            answer = ". ".join(rng.choices(sentences, k=rng.randint(20, 200)))
            question = ". ".join(rng.choices(sentences, k=rng.randint(1, 5)))
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def parameter_count(model_dir: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def attention_length(model_dir: Path, data: Path, seq: int) -> float:
    """The records' sum of squared lengths over their sum (each cut at `seq`): with padding-
    free packing a token attends within its own record, so a token's attention work goes
    with its record's length, not with the packed row's."""
    from lmforge.trainer.data.templates import NAMED_TEMPLATES
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = NAMED_TEMPLATES["chatml"]

    def tokens(messages: list[dict[str, str]]) -> int:
        encoded = tokenizer.apply_chat_template(messages, chat_template=template, return_dict=True)
        return len(encoded["input_ids"])

    lines = data.read_text().splitlines()
    lengths = [min(seq, tokens(json.loads(line)["messages"])) for line in lines]
    return sum(n * n for n in lengths) / sum(lengths)


def training_flops(params: int, config: dict[str, Any], tokens: float, length: float) -> float:
    """6·N·tokens (forward + backward of every weight) plus causal attention scores and
    values: 6 · layers · hidden · length · tokens (12·L·h·n per token in a record of n
    tokens, halved for causality; `length` from attention_length). LoRA runs still
    back-propagate through every layer (input gradients), so counting 6·N is the usual
    convention for comparing with other reports."""
    attention = 6 * config["num_hidden_layers"] * config["hidden_size"] * length * tokens
    return 6 * params * tokens + attention


# ---------------------------------------------------------------- inside a measured process


def worker_lmforge(
    model: Path, data: Path, workload: dict[str, Any], steps: int, out: Path
) -> dict[str, Any]:
    import torch
    import yaml

    from lmforge.api.kinds import TrainingJob
    from lmforge.api.validation import load_file
    from lmforge.local import local_run_config

    job = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": "gpu-bench"},
        "spec": {
            "model": {"source": f"file://{model}", "chatTemplate": "chatml"},
            "dataset": {
                "sources": [{"uri": str(data), "format": "openai"}],
                "maxSeqLength": workload["seq"],
                "packing": True,
            },
            "method": workload["method"],
            "training": {
                "maxSteps": steps,
                "learningRate": 1e-5,
                "precision": "bf16" if torch.cuda.is_available() else "fp32",
                "batchSize": {"perDevice": workload["batch"]},
                "loggingEverySteps": 10,
                **workload.get("training", {}),
            },
            "distributed": {"gpusPerNode": 1},
            "checkpoint": {"everySteps": steps * 10},
        },
    }
    path = out / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    (obj,) = load_file(path)
    assert isinstance(obj, TrainingJob)
    config = local_run_config(obj, path, out / "run", out)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    config.dump(config.output_dir / "run.json")
    from lmforge.trainer.__main__ import main as trainer_main

    code = trainer_main(["run", "--config", str(config.output_dir / "run.json")])
    if code:
        raise SystemExit(f"lmforge run failed (exit {code}): its error is above")
    # What the trainer's pre-flight estimate said this run needs on one GPU (the same call
    # as its first log line), to set beside what it took.
    from lmforge.trainer.launch import resolve_auto_strategy

    _, choice = resolve_auto_strategy(config)
    return {"estimated_gpu_memory_bytes": choice.per_gpu if choice else None}


def worker_trl(
    model: Path, data: Path, workload: dict[str, Any], steps: int, out: Path
) -> dict[str, Any]:
    """TRL's SFTTrainer with its defaults; only what makes the runs comparable is set."""
    import torch
    from datasets import load_dataset
    from lmforge.trainer.data.templates import NAMED_TEMPLATES
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = NAMED_TEMPLATES["chatml"]
    peft_config = None
    if workload["method"]["type"] == "lora":
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    args = SFTConfig(
        output_dir=str(out / "trl"),
        max_steps=steps,
        per_device_train_batch_size=workload["batch"],
        max_length=workload["seq"],
        packing=True,
        bf16=torch.cuda.is_available(),
        learning_rate=1e-5,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
    )
    SFTTrainer(
        model=str(model),
        args=args,
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=tokenizer,
        peft_config=peft_config,
    ).train()
    return {}


# Where a step's time goes (`--profile`): kernels on a GPU, operators on a CPU, by name.
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("cross-entropy", ("cross_entropy", "log_softmax", "nll_loss")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("communication", ("nccl",)),
    (
        "matmul",
        ("gemm", "matmul", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm"),
    ),
)
PROFILED_STEPS = 2


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, needles in KERNEL_CATEGORIES:
        if any(needle in lowered for needle in needles):
            return category
    return "elementwise and other"


def profile_summary(
    times: list[tuple[str, float]], steps: int, step_seconds: float, top: int = 12
) -> dict[str, Any]:
    """`times`: (kernel or operator, its own seconds) over `steps` profiled steps. What share
    of a step the device was busy, each category's share of that, and the top names."""
    busy = sum(t for _, t in times)
    categories: dict[str, float] = {}
    for name, t in times:
        categories[kernel_category(name)] = categories.get(kernel_category(name), 0.0) + t
    return {
        "steps_profiled": steps,
        "busy_seconds_per_step": busy / steps,
        "busy_fraction_of_step": busy / steps / step_seconds,
        "categories": {
            k: round(v / busy, 4) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])
        },
        "top": [
            {"name": name[:160], "ms_per_step": 1e3 * t / steps, "share": round(t / busy, 4)}
            for name, t in sorted(times, key=lambda nt: -nt[1])[:top]
        ],
    }


def install_profiler(warmup: int) -> Any:
    """A torch profiler over the `PROFILED_STEPS` steps after `warmup` (and one more to
    settle), stepped by a callback added to every Trainer; returns the profiler."""
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    profiler = profile(
        activities=activities,
        schedule=schedule(wait=warmup, warmup=1, active=PROFILED_STEPS, repeat=1),
    )

    class Stepper(transformers.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            profiler.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            profiler.step()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            profiler.stop()

    original = transformers.Trainer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), Stepper()]
        original(self, *args, **kwargs)

    transformers.Trainer.__init__ = init  # type: ignore[method-assign]
    return profiler


def profiled_times(profiler: Any) -> list[tuple[str, float]]:
    """Each GPU kernel's own time (on a CPU: each operator's), in seconds."""
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    if kernels:
        return [(e.key, e.self_device_time_total / 1e6) for e in kernels]
    return [
        (e.key, e.self_cpu_time_total / 1e6) for e in events if not e.key.startswith("ProfilerStep")
    ]


def worker(args: argparse.Namespace) -> None:
    import torch

    from benchmarks.trainer_overhead import Measure

    measure = Measure(args.warmup)
    measure.install()
    profiler = install_profiler(args.warmup) if args.profile else None
    out = Path(args.out)
    run = worker_trl if args.worker == "trl" else worker_lmforge
    extra = run(Path(args.model), Path(args.data), workload_of(args.workload), args.steps, out)
    result = {**measure.result(), **extra}
    if profiler is not None:
        result["profile"] = profile_summary(
            profiled_times(profiler), PROFILED_STEPS, result["step_seconds_median"]
        )
    cuda = torch.cuda.is_available()
    result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    result["real_tokens"], result["all_tokens"] = measure.real_tokens, measure.all_tokens
    result["steps"] = len(measure.step_ends)
    (out / "measure.json").write_text(json.dumps(result))


def measure_in_process(kind: str, workload: str, model: Path, data: Path, args: Any) -> Any:
    out = Path(tempfile.mkdtemp(prefix=f"{kind}-{workload}-"))
    command = [sys.executable, "-m", "benchmarks.gpu_training", "--worker", kind]
    command += ["--workload", workload, "--model", str(model), "--data", str(data)]
    command += ["--out", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--profile"] * args.profile
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{kind} {workload} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads((out / "measure.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(WORKLOADS), action="append")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="check the plumbing on the CPU: a tiny model, both trainers (needs --out)",
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--profile",
        action="store_true",
        help=f"profile {PROFILED_STEPS} steps after the warm-up in each trainer: where the "
        "GPU's time goes, by kernel (the steps' timing then includes the profiler's cost)",
    )
    parser.add_argument("--worker", choices=["lmforge", "trl"])
    parser.add_argument("--workload", choices=sorted([*WORKLOADS, "smoke"]))
    parser.add_argument("--model")
    parser.add_argument("--data")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    names = args.only or list(WORKLOADS)
    if args.cpu:
        if Path(args.out) == RESULTS:
            parser.error("--cpu measures no GPU: give --out a path of its own")
        names = ["smoke"]
    elif not torch.cuda.is_available():
        print("gpu_training: skipped, needs a CUDA GPU (see the README for the command)")
        return 0
    device = torch.cuda.get_device_name(0) if not args.cpu else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    import peft
    import transformers
    import trl

    report: dict[str, Any] = {
        **header("gpu_training", argv),
        "machine": {
            "platform": platform.platform(),
            "gpu": device,
            "gpus": torch.cuda.device_count() if not args.cpu else 0,
            "peak_bf16_flops": peak,
            "python": platform.python_version(),
            "versions": {
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
                "peft": peft.__version__,
            },
        },
        "workloads": {},
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmforge-gpu-bench-") as tmp:
        data = write_data(Path(tmp) / "chat.jsonl", args.records)
        for name in names:
            workload = workload_of(name)
            model = build_model(Path(tmp) / name, workload["config"])
            params = parameter_count(model)
            length = attention_length(model, data, workload["seq"])
            results = {}
            for kind in ("lmforge", "trl"):
                print(f"{name}: {kind} ...", flush=True)
                m = measure_in_process(kind, name, model, data, args)
                tokens_per_step = m["real_tokens_per_batch"]  # one batch a step
                step = m["step_seconds_median"]
                flops = training_flops(params, workload["config"], tokens_per_step, length)
                m["tokens_per_second_per_gpu"] = tokens_per_step / step
                m["mfu"] = flops / step / peak if peak else None
                results[kind] = m
            ratio = (
                results["lmforge"]["tokens_per_second_per_gpu"]
                / results["trl"]["tokens_per_second_per_gpu"]
            )
            report["workloads"][name] = {
                "date": report["date"],
                "command": report["command"],
                "parameters": params,
                "attention_length": length,
                **results,
                "ratio_to_trl": ratio,
            }
            if workload.get("training", {}).get("ligerKernels"):
                report["workloads"][name]["liger_kernel"] = metadata.version("liger-kernel")
            for kind in ("lmforge", "trl"):
                m = results[kind]
                mfu = f"{100 * m['mfu']:.1f} %" if m["mfu"] is not None else "?"
                peak = m.get("peak_gpu_memory_bytes")
                estimate = m.get("estimated_gpu_memory_bytes")
                memory = f"{peak / 2**30:.1f}" if peak else "-"
                memory += f" (est. {estimate / 2**30:.1f})" if estimate and peak else ""
                rows.append(
                    (f"{name} {kind}", f"{m['tokens_per_second_per_gpu']:,.0f}", mfu, memory)
                )
            rows.append((f"{name} lmforge / trl", f"{ratio:.2f}x", "", ""))
            for kind in ("lmforge", "trl"):
                if "profile" in results[kind]:
                    profile = results[kind]["profile"]
                    shares = ", ".join(
                        f"{k} {100 * v:.0f} %" for k, v in profile["categories"].items()
                    )
                    busy = 100 * profile["busy_fraction_of_step"]
                    print(f"{name} {kind}: busy {busy:.0f} % of a step; {shares}")
    kept = keep_earlier_workloads(report, Path(args.out))
    publish(
        report,
        Path(args.out),
        f"gpu_training on {device}",
        [("run", "tokens/s/GPU", "MFU", "peak GiB"), *rows],
    )
    if kept:
        print(f"kept from an earlier run on this GPU: {', '.join(kept)}")
    return 0


def keep_earlier_workloads(report: dict[str, Any], out: Path) -> list[str]:
    """The workloads `out` holds from an earlier run on the same GPU and software that this
    run did not measure (`--only`) stay in the file, each with the date and command that
    measured it, so that the workloads can run as separate commands. Returns their names."""
    if not out.is_file():
        return []
    earlier = json.loads(out.read_text())
    same = ("gpu", "gpus", "versions")
    if any(earlier.get("machine", {}).get(key) != report["machine"][key] for key in same):
        return []
    kept = []
    for name, entry in earlier.get("workloads", {}).items():
        if name not in report["workloads"]:
            entry.setdefault("date", earlier["date"])
            entry.setdefault("command", earlier["command"])
            report["workloads"][name] = entry
            kept.append(name)
    return kept


if __name__ == "__main__":
    raise SystemExit(main())
