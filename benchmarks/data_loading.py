"""Benchmark: peak memory and records/s of preparing synthetic Alpaca data for training.

Compares, in one run on one machine, the trainer's data step (`prepare_data`: records streamed
into memory-mapped Arrow files, tokenized with `datasets.map`) with the list-based loader it
replaced (`load_examples` + `tokenize_examples` at BASELINE_COMMIT, read from git). Each
(loader, size) runs in its own process so that its peak RSS (`ru_maxrss`) is its own; worker
processes of `datasets.map` are measured too (RUSAGE_CHILDREN).

    python -m benchmarks.data_loading                 # the whole data step at 200k, 1M, 2M
    python -m benchmarks.data_loading --sizes 20000 100000 --load-sizes 200000 2000000
    python benchmarks/data_loading.py --baseline-max 200000   # old loader only up to 200k

Two stages: "prepare" is the whole data step (read, validate, mix, tokenize: what the trainer
runs); "load" stops before tokenization, so that large sizes are affordable on a small, shared
machine (tokenizing is the slow part: ~1 ms per conversation for rendering the chat template).

Prints a table and writes benchmarks/results/data_loading.json. Not a test: the figures depend
on the machine; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import header, machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_loading.json"
# The last commit whose trainer held every record as Python objects (list-based loader).
BASELINE_COMMIT = "32943603a081d2d798e6f5d57a0764be25c2f4b6"
BASELINE_PACKAGE = "lmforge_baseline_data"
DATA_FILES = ("__init__.py", "collate.py", "examples.py", "formats.py", "loading.py")
DATA_FILES += ("templates.py", "tokenization.py")
MAX_SEQ_LENGTH = 256


def alpaca_record(i: int) -> dict[str, str]:
    """A synthetic Alpaca record, different for every i (about 60 tokens rendered)."""
    return {
        "instruction": f"Give three tips for staying healthy, number {i}.",
        "input": f"The reader is {20 + i % 60} years old." if i % 3 == 0 else "",
        "output": f"1. Eat a balanced diet. 2. Exercise {i % 7 + 1} times a week. 3. Sleep well.",
    }


def write_dataset(path: Path, count: int) -> None:
    with path.open("w") as out:
        for i in range(count):
            out.write(json.dumps(alpaca_record(i)) + "\n")


def extract_baseline(folder: Path) -> Path:
    """The list-based data package of BASELINE_COMMIT, importable as BASELINE_PACKAGE."""
    package = folder / BASELINE_PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES:
        source = subprocess.run(
            ["git", "show", f"{BASELINE_COMMIT}:trainer/lmforge/trainer/data/{name}"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (package / name).write_text(source.replace("lmforge.trainer.data", BASELINE_PACKAGE))
    return folder


# ---------------------------------------------------------------- one measurement (a process)


def worker(loader: str, stage: str, data: Path, tokenizer_dir: Path, cache: Path) -> dict[str, Any]:
    """Prepare `data` with one loader; returns seconds, records and peak RSS.

    Stage "prepare" is the whole data step (read, validate, mix, tokenize); "load" stops
    before tokenization (read, validate, mix), which is cheap enough to run at every size
    on a small machine.
    """
    from transformers import AutoTokenizer

    from lmforge.api.common import DatasetSpec, DataSource

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = DatasetSpec(
        sources=[DataSource(uri=str(data), format="alpaca")], max_seq_length=MAX_SEQ_LENGTH
    )
    tokens: int | None = None
    if loader == "new" and stage == "load":
        from lmforge.trainer.data.prepare import mix_examples

        rss_start = _rss_now()
        started = time.perf_counter()
        records = len(mix_examples(spec, data.parent, seed=0, cache_dir=cache).train_order)
    elif loader == "old" and stage == "load":
        baseline = __import__(BASELINE_PACKAGE)
        rss_start = _rss_now()
        started = time.perf_counter()
        records = len(baseline.load_examples(spec, data.parent, seed=0)[0])
    elif loader == "new":
        from lmforge.trainer.data import NAMED_TEMPLATES, prepare_data

        rss_start = _rss_now()
        started = time.perf_counter()
        prepared = prepare_data(
            spec,
            tokenizer,
            chat_template=NAMED_TEMPLATES["chatml"],
            continued_pretraining=False,
            base_dir=data.parent,
            seed=0,
            cache_dir=cache,
        )
        records, tokens = len(prepared.train), prepared.stats["train"]["tokens"]
    else:
        baseline = __import__(BASELINE_PACKAGE)
        rss_start = _rss_now()
        started = time.perf_counter()
        train, _ = baseline.load_examples(spec, data.parent, seed=0)
        tokenized = baseline.tokenize_examples(
            train,
            tokenizer,
            chat_template=baseline.NAMED_TEMPLATES["chatml"],
            max_seq_length=MAX_SEQ_LENGTH,
            train_on_prompt=False,
            packing=False,
        )
        records, tokens = len(tokenized.records), tokenized.stats["tokens"]
    seconds = time.perf_counter() - started
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "seconds": round(seconds, 2),
        "records": records,
        "tokens": tokens,
        "rss_before_bytes": rss_start,
        "peak_rss_bytes": main,
        "peak_child_rss_bytes": children,
    }


def _rss_now() -> int:
    """Current resident set size (after imports and tokenizer, before the data)."""
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- the run


def measure(loader: str, stage: str, data: Path, tokenizer_dir: Path, work: Path) -> dict[str, Any]:
    cache = Path(tempfile.mkdtemp(prefix=f"cache-{loader}-", dir=work))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(work), str(ROOT)])}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "benchmarks.data_loading", "--worker", loader, stage]
    command += ["--data", str(data), "--tokenizer", str(tokenizer_dir), "--cache", str(cache)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{loader} on {data.name} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", str(cache)], check=False)
    return result


def mib(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[200_000, 1_000_000, 2_000_000],
        help="record counts, run in this order",
    )
    parser.add_argument(
        "--baseline-max",
        type=int,
        default=2_000_000,
        help="largest size to run the list-based baseline on (it holds everything in memory)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--load-sizes",
        type=int,
        nargs="*",
        default=[],
        help="record counts to measure the load stage only at (read, validate, mix; no tokens)",
    )
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        loader, stage = args.worker
        print(json.dumps(worker(loader, stage, args.data, args.tokenizer, args.cache)))
        return 0

    from lmforge.trainer.tiny import build_tokenizer, bundled_texts

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        work = extract_baseline(Path(tmp))
        tokenizer_dir = work / "tokenizer"
        build_tokenizer(bundled_texts()).save_pretrained(tokenizer_dir)
        runs = [("prepare", size) for size in args.sizes]
        runs += [("load", size) for size in args.load_sizes]
        for stage, size in runs:  # in the order given: the most telling first
            data = work / f"alpaca-{size}.jsonl"
            write_dataset(data, size)
            loaders = ["new", "old"] if size <= args.baseline_max else ["new"]
            for loader in loaders:
                measured = measure(loader, stage, data, tokenizer_dir, work)
                result = {"loader": loader, "stage": stage, "size": size, **measured}
                result["records_per_second"] = round(size / result["seconds"], 1)
                rows.append(result)
                write_report(args, rows)  # after every measurement: a long run keeps its figures
                print(
                    f"{loader:>4} {stage:>7} {size:>9,} records: {result['seconds']:>8.1f} s, "
                    f"{result['records_per_second']:>8,.0f} records/s, peak RSS "
                    f"{mib(result['peak_rss_bytes'])} MiB (workers "
                    f"{mib(result['peak_child_rss_bytes'])} MiB)",
                    flush=True,
                )
            data.unlink()

    report = write_report(args, rows)
    print()
    print(table(rows))
    print(f"\nratios: {json.dumps(report['ratios'])}")
    print(f"written to {args.output}")
    return 0


def write_report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    import datasets
    import pyarrow
    import tokenizers
    import transformers

    report = {
        **header("data_loading"),
        "machine": machine(
            datasets=datasets.__version__,
            pyarrow=pyarrow.__version__,
            tokenizers=tokenizers.__version__,
            transformers=transformers.__version__,
        ),
        "setup": {
            "format": "alpaca (synthetic)",
            "chat_template": "chatml",
            "max_seq_length": MAX_SEQ_LENGTH,
            "baseline": f"list-based load_examples + tokenize_examples at {BASELINE_COMMIT}",
            "baseline_max_records": args.baseline_max,
        },
        "results": rows,
        "ratios": ratios(rows),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return report


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage: peak RSS at the largest size over the smallest per loader; new vs old."""
    out: dict[str, Any] = {}
    for stage in ("prepare", "load"):
        staged = [r for r in rows if r["stage"] == stage]
        for loader in ("new", "old"):
            mine = sorted((r for r in staged if r["loader"] == loader), key=lambda r: r["size"])
            if len(mine) >= 2:
                first, last = mine[0], mine[-1]
                name = f"{stage}_{loader}_peak_rss_{last['size']}_over_{first['size']}"
                out[name] = round(last["peak_rss_bytes"] / first["peak_rss_bytes"], 3)
        for size in sorted({r["size"] for r in staged}):
            pair = {r["loader"]: r for r in staged if r["size"] == size}
            if len(pair) == 2:
                new, old = pair["new"], pair["old"]
                out[f"{stage}_peak_rss_new_over_old_{size}"] = round(
                    new["peak_rss_bytes"] / old["peak_rss_bytes"], 3
                )
                out[f"{stage}_speed_new_over_old_{size}"] = round(
                    new["records_per_second"] / old["records_per_second"], 3
                )
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| loader | stage | records | seconds | records/s | RSS before data (MiB) | peak RSS (MiB) "
        "| peak worker RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = "prepare_data (Arrow)" if r["loader"] == "new" else "list-based (baseline)"
        lines.append(
            f"| {name} | {r['stage']} | {r['size']:,} | {r['seconds']:,.1f} | "
            f"{r['records_per_second']:,.0f} | "
            f"{mib(r['rss_before_bytes'])} | {mib(r['peak_rss_bytes'])} | "
            f"{mib(r['peak_child_rss_bytes'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
