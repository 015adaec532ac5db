"""The data step of a training run: sources -> validated examples -> token records, on disk.

Records live in Arrow files (Hugging Face `datasets`, memory-mapped) under a cache folder on
the job's output, never as Python objects, so memory stays flat however large the dataset is:

1. each source is streamed record by record, validated, and written to an Arrow file
   (problems are collected, with file, line and field, and raised together);
2. eval hold-out, weights and shuffling are index arithmetic over those files (numpy);
3. tokenization reads the example files front to back (several processes for large data, each
   a contiguous range), writing tokens and per-record counts (length, prompt length, trained
   tokens, truncated) in file order; files are streamed, not memory-mapped, so no process
   keeps the pages it has read;
4. each split is then an index map over the tokens: records without trained tokens are
   dropped, and continued pretraining joins documents with EOS and cuts blocks of
   maxSeqLength; packing puts whole records into sequences of at most maxSeqLength (best fit,
   window by window: see packing.py); both stream.

`prepare_data` returns the train/eval datasets, the statistics and what to tell the user.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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

log = logging.getLogger(__name__)

BATCH = 2000  # records per tokenization batch (halved) and per Arrow batch written
FILE_BATCH = 20_000  # records per record batch in the files (fewer headers to read)
PARALLEL_FROM = 20_000  # examples from which tokenization uses several processes
EXAMPLE_SCHEMA = pa.schema([("example", pa.string())])
TOKENS = pa.list_(pa.int32())
EXAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(Example))
TOKEN_SCHEMA = pa.schema(
    [
        ("input_ids", TOKENS),
        ("labels", TOKENS),
        ("length", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("trained", pa.int64()),
        ("truncated", pa.bool_()),
        ("problem", pa.string()),
    ]
)
TOKEN_COLUMNS = tuple(TOKEN_SCHEMA.names)


@dataclass
class SourceCount:
    """How many valid examples a source gave and how many of them training uses."""

    uri: str
    examples: int
    weight: float = 1.0
    in_training: int = 0
    held_out: int = 0


@dataclass
class OnDisk:
    """A dataset as its Arrow files, an optional index map over them and the columns used:
    what another process opens to get the same dataset without preparing it again."""

    files: list[str]
    indices: np.ndarray | None = None
    columns: list[str] | None = None

    def open(self) -> Any:
        import datasets

        found = datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in self.files])
        if self.indices is not None:
            found = found.select(self.indices)
        return found.select_columns(self.columns) if self.columns else found


@dataclass
class PreparedData:
    """Token datasets ready for a Trainer, and what preparation did to the data."""

    train: Any  # datasets.Dataset of input_ids/labels (+ position_ids when packed)
    eval: Any | None
    eval_examples: Sequence[Example]
    stats: dict[str, Any]
    summary: str
    warnings: list[str] = field(default_factory=list)
    on_disk: dict[str, OnDisk] = field(default_factory=dict)  # train, eval, eval_examples

    def metrics(self) -> dict[str, float]:
        """The training split's counts for metrics.json and the job's status."""
        return data_metrics(self.stats["train"])

    def save(self, path: Path) -> None:
        """Write what `load` needs next to the data (index maps as .npy), atomically."""
        described: dict[str, Any] = {"stats": self.stats, "on_disk": {}}
        for name, where in self.on_disk.items():
            entry: dict[str, Any] = {"files": where.files, "columns": where.columns}
            if where.indices is not None:
                entry["indices"] = str(path.with_name(f"{path.stem}-{name}.npy"))
                np.save(entry["indices"], where.indices)
            described["on_disk"][name] = entry
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(described))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PreparedData:
        """The data another process prepared and saved at `path` (memory-mapped, shared)."""
        described = json.loads(path.read_text())
        on_disk = {
            name: OnDisk(
                entry["files"],
                np.load(entry["indices"], mmap_mode="r") if "indices" in entry else None,
                entry["columns"],
            )
            for name, entry in described["on_disk"].items()
        }
        stats = described["stats"]
        return cls(
            on_disk["train"].open(),
            on_disk["eval"].open() if "eval" in on_disk else None,
            ExampleColumn(on_disk["eval_examples"].open()) if "eval_examples" in on_disk else [],
            stats,
            stats["summary"],
            stats["warnings"],
            on_disk,
        )


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
    tokens = tokenize_files(mixed.files, tokenize, cache_dir, num_proc)
    _raise_problems(tokens, [mixed.train_order, mixed.eval_order])
    split = _Split(tokens, spec, continued_pretraining, cache_dir)
    on_disk: dict[str, OnDisk] = {}
    on_disk["train"], train_stats = split("train", mixed.train_order)
    train = on_disk["train"].open()
    eval_data, eval_stats = None, None
    eval_examples: Sequence[Example] = []
    if len(mixed.eval_order):
        on_disk["eval"], eval_stats = split("eval", mixed.eval_order)
        eval_data = on_disk["eval"].open()
        on_disk["eval_examples"] = OnDisk(mixed.example_files, mixed.eval_order)
        eval_examples = ExampleColumn(on_disk["eval_examples"].open())

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
    return PreparedData(train, eval_data, eval_examples, stats, summary, found, on_disk)


def prepare_once_per_node(
    spec: DatasetSpec,
    tokenizer: Any,
    *,
    chat_template: str | None,
    continued_pretraining: bool,
    base_dir: Path,
    seed: int,
    cache_dir: Path,
    env: Mapping[str, str] = os.environ,
) -> PreparedData:
    """`prepare_data`, done once per node: under torchrun the node's first process
    (LOCAL_RANK 0) prepares, the others wait for it and open the same files (memory-mapped,
    so the node holds one copy in its page cache) instead of each tokenizing its own."""
    prepare = functools.partial(
        prepare_data,
        spec,
        tokenizer,
        chat_template=chat_template,
        continued_pretraining=continued_pretraining,
        base_dir=base_dir,
        seed=seed,
        cache_dir=cache_dir,
    )
    if "LOCAL_RANK" not in env:
        return prepare()
    # One name per launch: the torchrun agent (every local rank's parent) and its start time.
    agent = os.getppid()
    started = Path(f"/proc/{agent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    marker = cache_dir / f"prepared-{agent}-{started}.json"
    if env["LOCAL_RANK"] == "0":
        for old in cache_dir.glob("prepared-*"):  # an earlier launch's
            old.unlink()
        data = prepare()
        data.save(marker)
        return data
    log.info("waiting for local rank 0 to prepare the data (%s)", marker)
    while not marker.exists():
        time.sleep(0.5)
    return PreparedData.load(marker)


@dataclass
class MixedExamples:
    """Validated examples on disk, chosen and ordered for training and evaluation.

    `files` hold every example once: the training sources', then the eval sources'; the
    orders are indices into all of them, in that sequence.
    """

    files: list[ExampleFile]
    train_order: np.ndarray  # weighted and shuffled
    eval_order: np.ndarray  # held out (or the eval sources), shuffled; may be empty
    sources: list[SourceCount]

    @property
    def example_files(self) -> list[str]:
        return [str(f.path) for f in self.files]


@dataclass(frozen=True)
class ExampleFile:
    """An Arrow stream file of validated examples and how many it holds."""

    path: Path
    examples: int


def mix_examples(spec: DatasetSpec, base_dir: Path, seed: int, cache_dir: Path) -> MixedExamples:
    """Stream every source into Arrow files, then hold out, weight and shuffle by index.

    Raises DataError with every problem of every source.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    problems: list[DataProblem] = []
    train_files = [
        _write_examples(source, base_dir, cache_dir / f"train-source-{i}.arrow", problems)
        for i, source in enumerate(spec.sources)
    ]
    eval_files = [
        _write_examples(source, base_dir, cache_dir / f"eval-source-{i}.arrow", problems)
        for i, source in enumerate(spec.eval_split.sources)
    ]
    if problems:
        raise DataError(problems)

    sizes = [f.examples for f in train_files]
    total = sum(sizes)
    counts = [
        SourceCount(source.uri, size, source.weight)
        for source, size in zip(spec.sources, sizes, strict=True)
    ]
    if spec.eval_split.sources:
        kept = [np.arange(size) for size in sizes]
        eval_order = total + np.arange(sum(f.examples for f in eval_files), dtype=np.int64)
    else:
        kept, eval_order = hold_out_indices(sizes, spec.eval_split.fraction, seed)
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
    return MixedExamples(train_files + eval_files, train_order, eval_order, counts)


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
) -> ExampleFile:
    """Stream a source's valid examples into an Arrow file."""
    rows = ({"example": example_to_json(e)} for e in iter_source(source, base_dir, problems))
    return ExampleFile(path, write_arrow(path, EXAMPLE_SCHEMA, rows))


def write_arrow(path: Path, schema: pa.Schema, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows to an Arrow stream file in batches (what `datasets` memory-maps)."""

    def batches() -> Iterator[pa.RecordBatch]:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == BATCH:
                yield pa.RecordBatch.from_pylist(batch, schema)
                batch = []
        if batch:
            yield pa.RecordBatch.from_pylist(batch, schema)

    return write_batches(path, schema, batches())


def write_batches(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> int:
    """Write record batches to an Arrow stream file atomically; returns the rows written.

    Small batches are joined up to FILE_BATCH rows: every batch has a header that whoever
    memory-maps the file reads, so fewer batches mean fewer pages touched.
    """
    written = 0
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        pending: list[pa.RecordBatch] = []

        def flush() -> None:
            if pending:
                writer.write_table(pa.Table.from_batches(pending, schema).combine_chunks())
                pending.clear()

        for batch in batches:
            pending.append(batch)
            written += batch.num_rows
            if sum(b.num_rows for b in pending) >= FILE_BATCH:
                flush()
        flush()
        if not written:
            writer.write_batch(pa.RecordBatch.from_pylist([], schema))
    tmp.replace(path)
    return written


def read_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow stream file, read (not memory-mapped) one at a time."""
    with pa.OSFile(str(path)) as source, pa.ipc.open_stream(source) as reader:
        yield from reader


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


@dataclass
class Tokens:
    """Every example's tokens, in file order (row i is example i of MixedExamples.files), and
    its counts as small arrays, so that statistics never page the token columns in."""

    files: list[str]  # the Arrow files of the TOKEN_SCHEMA columns, in order
    length: np.ndarray  # rendered length before truncation
    kept_length: np.ndarray  # len(input_ids)
    prompt_tokens: np.ndarray
    trained: np.ndarray
    truncated: np.ndarray
    with_problem: np.ndarray  # rows whose chat template refused the example


def tokenize_files(
    files: Sequence[ExampleFile], tokenize: _Tokenize, cache_dir: Path, num_proc: int | None
) -> Tokens:
    """Tokenize every example of `files`; several processes (each a contiguous range) from
    PARALLEL_FROM examples on, or `num_proc` when given."""

    total = sum(f.examples for f in files)
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if total >= PARALLEL_FROM else 1
    parts = max(1, min(num_proc, total))
    bounds = [total * k // parts for k in range(parts + 1)]
    ranges = list(itertools.pairwise(bounds))
    paths = [cache_dir / f"tokens-{k}-of-{parts}.arrow" for k in range(parts)]
    if parts == 1:
        _tokenize_range(files, ranges[0], tokenize, paths[0])
    else:
        # Forked: the tokenizer and the template are inherited, not pickled.
        context = multiprocessing.get_context("fork")
        workers = [
            context.Process(target=_tokenize_range, args=(files, span, tokenize, path))
            for span, path in zip(ranges, paths, strict=True)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        failed = [(w.exitcode, span) for w, span in zip(workers, ranges, strict=True) if w.exitcode]
        if failed:
            code, (start, end) = failed[0]
            raise RuntimeError(
                f"tokenizing examples {start}-{end} failed in a worker process (exit code "
                f"{code}); its error is printed above"
            )

    # Small copies, batch by batch: a zero-copy view would keep the whole batch it was read
    # in alive, token columns included.
    columns: dict[str, list[np.ndarray]] = {key: [] for key in TOKEN_COLUMNS}
    for path in paths:
        for batch in read_batches(path):
            for key in ("length", "prompt_tokens", "trained"):
                columns[key].append(_as_numpy(batch.column(key)).astype(np.int32))
            columns["truncated"].append(_as_numpy(batch.column("truncated")).astype(bool))
            lengths = pc.list_value_length(batch.column("input_ids"))
            columns["input_ids"].append(_as_numpy(lengths).astype(np.int32))
            problems = pc.not_equal(batch.column("problem"), "")
            columns["problem"].append(_as_numpy(problems).astype(bool))

    def joined(key: str, dtype: Any) -> np.ndarray:
        return np.concatenate(columns[key]) if columns[key] else np.zeros(0, dtype)

    return Tokens(
        [str(path) for path in paths],
        length=joined("length", np.int32),
        kept_length=joined("input_ids", np.int32),
        prompt_tokens=joined("prompt_tokens", np.int32),
        trained=joined("trained", np.int32),
        truncated=joined("truncated", bool),
        with_problem=np.flatnonzero(joined("problem", bool)),
    )


def _tokenize_range(
    files: Sequence[ExampleFile], span: tuple[int, int], tokenize: _Tokenize, path: Path
) -> None:
    """Tokenize examples start..end (global, in file order) into the Arrow file at `path`."""
    start, end = span

    def batches() -> Iterator[pa.RecordBatch]:
        offset = 0
        for file in files:
            if offset >= end:
                return
            if offset + file.examples <= start:
                offset += file.examples
                continue
            for batch in read_batches(file.path):
                first, last = max(start - offset, 0), min(end - offset, batch.num_rows)
                for at in range(first, last, BATCH // 2):
                    texts = batch.column("example").slice(at, min(BATCH // 2, last - at))
                    yield pa.RecordBatch.from_pydict(
                        tokenize({"example": texts.to_pylist()}), TOKEN_SCHEMA
                    )
                offset += batch.num_rows
                if offset >= end:
                    return

    write_batches(path, TOKEN_SCHEMA, batches())


def _raise_problems(tokens: Tokens, orders: Sequence[np.ndarray]) -> None:
    """DataError with every example a split uses that the chat template refused."""
    used = np.intersect1d(tokens.with_problem, np.concatenate(orders))
    if len(used):
        found = OnDisk(tokens.files, used).open()["problem"]
        raise DataError([DataProblem(*json.loads(text)) for text in found])


class _Split:
    """A split of the tokens (an index map): its records for the Trainer and its statistics."""

    def __init__(
        self, tokens: Tokens, spec: DatasetSpec, continued_pretraining: bool, cache_dir: Path
    ) -> None:
        self.tokens = tokens
        self.spec = spec
        self.continued_pretraining = continued_pretraining
        self.cache_dir = cache_dir

    def __call__(self, name: str, order: np.ndarray) -> tuple[OnDisk, dict[str, Any]]:
        tokens, spec = self.tokens, self.spec
        lengths = tokens.length[order]
        if self.continued_pretraining:
            path = self.cache_dir / f"{name}-blocks.arrow"
            documents = OnDisk(tokens.files, order).open()
            blocks = _write_blocks(documents, path, spec.max_seq_length, spec.keep_partial_block)
            stats = block_stats(
                documents=len(order),
                tokens_in=int(lengths.sum()),
                percentiles=percentiles(lengths),
                **blocks,
            )
            return OnDisk([str(path)]), stats

        trained = tokens.trained[order]
        dropped = trained == 0
        kept_lengths = tokens.kept_length[order][~dropped]
        prompt = tokens.prompt_tokens[order]
        stats = chat_stats(
            examples=len(order),
            records=int((~dropped).sum()),
            dropped=int(dropped.sum()),
            truncated=int(tokens.truncated[order].sum()),
            tokens=int(kept_lengths.sum()),
            trainable_tokens=int(trained.sum()),
            max_length=int(kept_lengths.max()) if len(kept_lengths) else 0,
            longest_dropped_prompt=int(prompt[dropped].max()) if dropped.any() else 0,
            percentiles=percentiles(lengths),
        )
        records = OnDisk(tokens.files, order[~dropped], ["input_ids", "labels"])
        if spec.packing:
            path = self.cache_dir / f"{name}-packed.arrow"
            stats.update(_write_packed(records.open(), path, spec.max_seq_length))
            records = OnDisk([str(path)])
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
