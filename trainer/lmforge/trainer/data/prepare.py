"""The data step of a training run: sources -> validated examples -> token records, on disk.

Records live in Arrow files (Hugging Face `datasets`, memory-mapped) under a cache folder on
the job's output, never as Python objects, so memory stays flat however large the dataset is:

1. each source is streamed record by record, validated, and written to an Arrow file
   (problems are collected, with file, line and field, and raised together);
2. eval hold-out, weights and shuffling are index arithmetic over those files (numpy);
3. tokenization is a `datasets.map` over the chosen indices (several processes for large
   data), keeping per-record counts (length, prompt length, truncated, dropped);
4. records without trained tokens are dropped, and continued pretraining joins documents
   with EOS and cuts blocks of maxSeqLength; packing puts whole records into sequences of at
   most maxSeqLength (best fit, window by window: see packing.py); both stream.

`prepare_data` returns the train/eval datasets, the statistics and what to tell the user.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lmforge.trainer.data.examples import DataError, DataProblem, Example
from lmforge.trainer.data.loading import iter_source
from lmforge.trainer.data.packing import PackingCount, pack_records
from lmforge.trainer.data.report import data_metrics, summary_line, warnings
from lmforge.trainer.data.tokenization import (
    IGNORE,
    Encoded,
    block_stats,
    chat_stats,
    cut_blocks,
    encode_example,
)

from lmforge.api.common import DatasetSpec, DataSource

BATCH = 2000  # records per Arrow record batch and per tokenization batch
PARALLEL_FROM = 20_000  # examples from which tokenization uses several processes
EXAMPLE_SCHEMA = pa.schema([("example", pa.string())])
TOKENS = pa.list_(pa.int32())
EXAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(Example))
TOKEN_COLUMNS = (
    "input_ids",
    "labels",
    "length",
    "prompt_tokens",
    "trained",
    "truncated",
    "problem",
)


@dataclass
class SourceCount:
    """How many valid examples a source gave and how many of them training uses."""

    uri: str
    examples: int
    weight: float = 1.0
    in_training: int = 0
    held_out: int = 0


@dataclass
class PreparedData:
    """Token datasets ready for a Trainer, and what preparation did to the data."""

    train: Any  # datasets.Dataset of input_ids/labels (+ position_ids when packed)
    eval: Any | None
    eval_examples: Sequence[Example]
    stats: dict[str, Any]
    summary: str
    warnings: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """The training split's counts for metrics.json and the job's status."""
        return data_metrics(self.stats["train"])


def prepare_data(
    spec: DatasetSpec,
    tokenizer: Any,
    *,
    chat_template: str | None,
    continued_pretraining: bool,
    base_dir: Path,
    seed: int,
    cache_dir: Path,
    num_proc: int | None = None,
) -> PreparedData:
    """Load, validate, mix and tokenize a dataset spec into Arrow files under `cache_dir`.

    Raises DataError with every problem of every source, or, when no record is left to train
    on, with the summary of what happened to them (the pre-flight verdict).
    """
    mixed = mix_examples(spec, base_dir, seed, cache_dir)
    tokenize = _Tokenize(
        tokenizer,
        chat_template=chat_template,
        max_seq_length=None if continued_pretraining else spec.max_seq_length,
        train_on_prompt=spec.train_on_prompt or continued_pretraining,
    )
    train, train_stats = _tokenized(
        mixed.train,
        tokenize,
        spec,
        continued_pretraining,
        cache_dir,
        "train",
        num_proc,
    )
    eval_data, eval_stats = None, None
    eval_examples: Sequence[Example] = []
    if mixed.eval is not None:
        eval_data, eval_stats = _tokenized(
            mixed.eval, tokenize, spec, continued_pretraining, cache_dir, "eval", num_proc
        )
        eval_examples = ExampleColumn(mixed.eval)

    stats: dict[str, Any] = {
        "train": train_stats,
        "eval": eval_stats,
        "sources": [dataclasses.asdict(count) for count in mixed.sources],
        "max_seq_length": spec.max_seq_length,
    }
    summary = summary_line(train_stats, spec.max_seq_length)
    if eval_stats:
        summary += f"; {eval_stats['records']:,} eval records"
    found = warnings(train_stats, spec.max_seq_length)
    if eval_stats:
        found += warnings(eval_stats, spec.max_seq_length, "evaluation")
    stats["summary"], stats["warnings"] = summary, found
    if len(train) == 0:
        verdict = f"no record is left to train on ({summary})"
        message = f"{verdict}: {'; '.join(found)}" if found else verdict
        raise DataError([DataProblem("dataset", "", "", message)])
    return PreparedData(train, eval_data, eval_examples, stats, summary, found)


@dataclass
class MixedExamples:
    """Validated examples on disk, chosen and ordered for training and evaluation."""

    train: Any  # datasets.Dataset of {"example": JSON}, weighted and shuffled (an index map)
    eval: Any | None
    sources: list[SourceCount]


def mix_examples(spec: DatasetSpec, base_dir: Path, seed: int, cache_dir: Path) -> MixedExamples:
    """Stream every source into Arrow files, then hold out, weight and shuffle by index.

    Raises DataError with every problem of every source.
    """
    import datasets

    datasets.disable_progress_bars()
    cache_dir.mkdir(parents=True, exist_ok=True)
    problems: list[DataProblem] = []
    train_sets = [
        _write_examples(source, base_dir, cache_dir / f"train-source-{i}.arrow", problems)
        for i, source in enumerate(spec.sources)
    ]
    eval_sets = [
        _write_examples(source, base_dir, cache_dir / f"eval-source-{i}.arrow", problems)
        for i, source in enumerate(spec.eval_split.sources)
    ]
    if problems:
        raise DataError(problems)

    sizes = [len(table) for table in train_sets]
    counts = [
        SourceCount(source.uri, size, source.weight)
        for source, size in zip(spec.sources, sizes, strict=True)
    ]
    if spec.eval_split.sources:
        kept = [np.arange(size) for size in sizes]
        eval_table = datasets.concatenate_datasets(eval_sets) if eval_sets else None
        eval_order = np.arange(len(eval_table)) if eval_table is not None else np.arange(0)
    else:
        kept, held = hold_out_indices(sizes, spec.eval_split.fraction, seed)
        eval_table = datasets.concatenate_datasets(train_sets) if train_sets else None
        eval_order = held
    for count, indices in zip(counts, kept, strict=True):
        count.held_out = count.examples - len(indices)
    train_order = weighted_indices(sizes, kept, [s.weight for s in spec.sources], seed)
    for i, count in enumerate(counts):
        start = sum(sizes[:i])
        count.in_training = int(((train_order >= start) & (train_order < start + sizes[i])).sum())
    np.random.default_rng([seed, 2]).shuffle(eval_order)

    if len(train_order) == 0:
        where = ", ".join(source.uri for source in spec.sources)
        raise DataError([DataProblem(where, "", "weight", "no training examples are left")])
    train = datasets.concatenate_datasets(train_sets).select(train_order)
    held_out = eval_table.select(eval_order) if eval_table is not None and len(eval_order) else None
    return MixedExamples(train, held_out, counts)


# ---------------------------------------------------------------- indices


def hold_out_indices(
    sizes: Sequence[int], fraction: float, seed: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per source, the indices kept for training; and the held-out global indices, in order.

    Holds out `fraction` of all records (at least one when fraction > 0), sampled as
    `load_examples` does, so both paths pick the same records for the same seed.
    """
    total = sum(sizes)
    count = math.floor(fraction * total + 0.5)
    if fraction > 0 and total >= 2:
        count = min(max(count, 1), total - 1)
    held = np.array(sorted(random.Random(f"eval/{seed}").sample(range(total), count)), np.int64)
    kept, start = [], 0
    for size in sizes:
        indices = np.arange(size, dtype=np.int64)
        inside = held[(held >= start) & (held < start + size)] - start
        kept.append(np.setdiff1d(indices, inside, assume_unique=True))
        start += size
    return kept, held


def weighted_indices(
    sizes: Sequence[int], kept: Sequence[np.ndarray], weights: Sequence[float], seed: int
) -> np.ndarray:
    """Global indices of the training records, repeated/sampled by weight and shuffled.

    Weight 2.5: every record twice plus a random half of them; 0.5: a random half.
    """
    parts: list[np.ndarray] = []
    start = 0
    for index, (size, indices, weight) in enumerate(zip(sizes, kept, weights, strict=True)):
        rng = random.Random(f"weight/{seed}/{index}")
        whole = math.floor(weight)
        count = math.floor((weight - whole) * len(indices) + 0.5)
        sample = indices[np.array(rng.sample(range(len(indices)), count), np.int64)]
        parts += [indices + start] * whole + [sample + start]
        start += size
    order = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    np.random.default_rng([seed, 1]).shuffle(order)
    return order


# ---------------------------------------------------------------- examples on disk


def _write_examples(
    source: DataSource, base_dir: Path, path: Path, problems: list[DataProblem]
) -> Any:
    """Stream a source's valid examples into an Arrow file; returns it memory-mapped."""
    import datasets

    rows = ({"example": example_to_json(e)} for e in iter_source(source, base_dir, problems))
    write_arrow(path, EXAMPLE_SCHEMA, rows)
    return datasets.Dataset.from_file(str(path))


def write_arrow(path: Path, schema: pa.Schema, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows to an Arrow stream file in batches (what `datasets` memory-maps)."""
    written = 0
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema))
                written += len(batch)
                batch = []
        if batch or not written:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema))
            written += len(batch)
    tmp.replace(path)
    return written


def example_to_json(example: Example) -> str:
    # Field by field: dataclasses.asdict deep-copies and costs more than the JSON itself.
    fields = {name: getattr(example, name) for name in EXAMPLE_FIELDS}
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def example_from_json(text: str) -> Example:
    data = json.loads(text)
    for key in ("messages", "tools", "chosen", "rejected"):
        data[key] = tuple(data[key])
    return Example(**data)


class ExampleColumn(Sequence[Example]):
    """Examples of an Arrow dataset, decoded when read (the eval examples for scoring)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Example]: ...
    def __getitem__(self, index: int | slice) -> Example | Sequence[Example]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return example_from_json(self.table[index]["example"])

    def __iter__(self) -> Iterator[Example]:
        for batch in self.table.iter(batch_size=BATCH):
            yield from (example_from_json(text) for text in batch["example"])


# ---------------------------------------------------------------- tokenization


class _Tokenize:
    """The batched `datasets.map` function: examples -> tokens and per-record counts."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        chat_template: str | None,
        max_seq_length: int | None,
        train_on_prompt: bool,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_seq_length = max_seq_length
        self.train_on_prompt = train_on_prompt

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {key: [] for key in TOKEN_COLUMNS}
        for text in batch["example"]:
            problems: list[DataProblem] = []
            encoded = encode_example(
                example_from_json(text),
                self.tokenizer,
                chat_template=self.chat_template,
                max_seq_length=self.max_seq_length,
                train_on_prompt=self.train_on_prompt,
                problems=problems,
            )
            if encoded is None:  # the chat template refused it; reported with its origin
                encoded = Encoded([], [], 0, 0, False)
            out["input_ids"].append(encoded.ids)
            out["labels"].append(encoded.labels)
            out["length"].append(encoded.length)
            out["prompt_tokens"].append(encoded.prompt_tokens)
            # Counted here, so that the statistics never page the token columns back in.
            out["trained"].append(sum(label != IGNORE for label in encoded.labels))
            out["truncated"].append(encoded.truncated)
            out["problem"].append(json.dumps(dataclasses.astuple(problems[0])) if problems else "")
        return out


def _tokenized(
    examples: Any,
    tokenize: _Tokenize,
    spec: DatasetSpec,
    continued_pretraining: bool,
    cache_dir: Path,
    split: str,
    num_proc: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Tokenize a split; returns the records a Trainer takes and the split's statistics."""
    import datasets

    if num_proc is None and len(examples) >= PARALLEL_FROM:
        num_proc = min(os.cpu_count() or 1, 8)
    tokens = examples.map(
        tokenize,
        batched=True,
        batch_size=BATCH // 2,
        remove_columns=["example"],
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        load_from_cache_file=False,
        cache_file_name=str(cache_dir / f"{split}-tokens.arrow"),
        features=datasets.Features(
            {
                "input_ids": datasets.List(datasets.Value("int32")),
                "labels": datasets.List(datasets.Value("int32")),
                "length": datasets.Value("int64"),
                "prompt_tokens": datasets.Value("int64"),
                "trained": datasets.Value("int64"),
                "truncated": datasets.Value("bool"),
                "problem": datasets.Value("string"),
            }
        ),
    )
    table = tokens.data
    bad = np.flatnonzero(_as_numpy(pc.not_equal(table.column("problem"), "")))
    if len(bad):
        found = tokens.select(bad)["problem"]
        raise DataError([DataProblem(*json.loads(text)) for text in found])

    lengths = _as_numpy(table.column("length"))
    if continued_pretraining:
        path = cache_dir / f"{split}-blocks.arrow"
        blocks = _write_blocks(tokens, path, spec.max_seq_length, spec.keep_partial_block)
        stats = block_stats(
            documents=len(tokens),
            tokens_in=int(lengths.sum()),
            percentiles=percentiles(lengths),
            **blocks,
        )
        return datasets.Dataset.from_file(str(path)), stats

    trained = _as_numpy(table.column("trained"))
    truncated = _as_numpy(table.column("truncated"))
    dropped = trained == 0
    kept_lengths = _as_numpy(pc.list_value_length(table.column("input_ids")))[~dropped]
    prompt = _as_numpy(table.column("prompt_tokens"))
    stats = chat_stats(
        examples=len(tokens),
        records=int((~dropped).sum()),
        dropped=int(dropped.sum()),
        truncated=int(truncated.sum()),
        tokens=int(kept_lengths.sum()),
        trainable_tokens=int(trained.sum()),
        max_length=int(kept_lengths.max()) if len(kept_lengths) else 0,
        longest_dropped_prompt=int(prompt[dropped].max()) if dropped.any() else 0,
        percentiles=percentiles(lengths),
    )
    records = tokens.select(np.flatnonzero(~dropped)).select_columns(["input_ids", "labels"])
    if spec.packing:
        path = cache_dir / f"{split}-packed.arrow"
        stats.update(_write_packed(records, path, spec.max_seq_length))
        records = datasets.Dataset.from_file(str(path))
    return records, stats


def _as_numpy(column: Any) -> np.ndarray:
    return np.asarray(column.to_numpy(zero_copy_only=False))


def percentiles(lengths: np.ndarray) -> dict[str, int]:
    """p50/p90/p99/max of token lengths (nearest rank), as `length_percentiles` computes."""
    if not len(lengths):
        return {}
    ordered = np.sort(lengths)
    n = len(ordered)

    def rank(q: float) -> int:
        return int(ordered[min(n - 1, max(0, math.ceil(q * n) - 1))])

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": int(ordered[-1])}


def _write_blocks(tokens: Any, path: Path, size: int, keep_partial: bool) -> dict[str, Any]:
    """Cut the EOS-joined token stream of all documents into blocks, written to `path`."""
    schema = pa.schema([("input_ids", TOKENS), ("labels", TOKENS)])
    found: dict[str, Any] = {"blocks": 0, "tokens": 0, "tokens_trained": 0, "partial_block": "none"}

    def documents() -> Iterator[list[int]]:
        for batch in tokens.iter(batch_size=BATCH):
            yield from batch["input_ids"]

    def rows() -> Iterator[dict[str, list[int]]]:
        for block in cut_blocks(documents(), size):
            if len(block) < size:
                found["partial_block"] = "kept" if keep_partial else "dropped"
                if not keep_partial:
                    continue
            found["blocks"] += 1
            found["tokens"] += len(block)
            found["tokens_trained"] += len(block) - 1
            yield {"input_ids": block, "labels": [IGNORE, *block[1:]]}

    write_arrow(path, schema, rows())
    return found


def _write_packed(records: Any, path: Path, size: int) -> dict[str, Any]:
    """Pack records into sequences of at most `size` tokens, written to `path`; the counts."""
    schema = pa.schema([("input_ids", TOKENS), ("labels", TOKENS), ("position_ids", TOKENS)])

    def pairs() -> Iterator[tuple[list[int], list[int]]]:
        for batch in records.iter(batch_size=BATCH):
            yield from zip(batch["input_ids"], batch["labels"], strict=True)

    count = PackingCount()
    write_arrow(path, schema, pack_records(pairs(), size, count))
    return count.as_dict()
