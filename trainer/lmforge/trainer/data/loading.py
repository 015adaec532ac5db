"""Read data sources (files, directories, hub datasets), validate them and mix them by weight."""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any

from lmforge.trainer.data import jsonstream
from lmforge.trainer.data.examples import DataError, DataProblem, Example
from lmforge.trainer.data.formats import (
    KNOWN_FORMATS,
    LMFLOW_TYPES,
    RecordCheck,
    detect_format,
    formats_agree,
    parse_record,
)

from lmforge.api.common import DatasetSpec, DataSource

TABLE_SUFFIXES = (".parquet", ".csv", ".arrow")
DATA_SUFFIXES = (".json", ".jsonl", ".txt", *TABLE_SUFFIXES)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# (location for problems, origin for the Example, the raw record)
RawRecord = tuple[str, str, Any]


def load_source(source: DataSource, base_dir: Path) -> list[Example]:
    """All records of one source, parsed and validated.

    Raises DataError listing every problem found in the source (all files, all records).
    """
    problems: list[DataProblem] = []
    examples = _read_source(source, base_dir, problems)
    if problems:
        raise DataError(problems)
    return examples


def load_examples(
    spec: DatasetSpec, base_dir: Path, seed: int
) -> tuple[list[Example], list[Example]]:
    """The (train, eval) examples of a dataset spec: loaded, validated, weighted and shuffled.

    Every source is read before anything is raised, so one DataError lists the problems of all
    of them. Evaluation examples come from `eval_split.sources` (each record once) or else are
    `eval_split.fraction` of the distinct training records, held out before weighting so that
    no record repeated by a weight lands in both splits.
    """
    problems: list[DataProblem] = []
    train_sets = [_read_source(source, base_dir, problems) for source in spec.sources]
    eval_sets = [_read_source(source, base_dir, problems) for source in spec.eval_split.sources]
    if problems:
        raise DataError(problems)

    if spec.eval_split.sources:
        eval_examples = [example for examples in eval_sets for example in examples]
    else:
        train_sets, eval_examples = _hold_out(train_sets, spec.eval_split.fraction, seed)

    train: list[Example] = []
    for index, (source, examples) in enumerate(zip(spec.sources, train_sets, strict=True)):
        rng = random.Random(f"weight/{seed}/{index}")
        train += _apply_weight(examples, source.weight, rng)
    if not train:
        where = ", ".join(source.uri for source in spec.sources)
        raise DataError([DataProblem(where, "", "weight", "no training examples are left")])
    random.Random(f"shuffle/{seed}").shuffle(train)
    random.Random(f"shuffle-eval/{seed}").shuffle(eval_examples)
    return train, eval_examples


def _apply_weight(examples: list[Example], weight: float, rng: random.Random) -> list[Example]:
    """Weight 2.5: every record twice plus a random half of them; 0.5: a random half."""
    whole = math.floor(weight)
    count = math.floor((weight - whole) * len(examples) + 0.5)
    return examples * whole + rng.sample(examples, count)


def _hold_out(
    sets: list[list[Example]], fraction: float, seed: int
) -> tuple[list[list[Example]], list[Example]]:
    """Move `fraction` of all records (at least one when fraction > 0) into an eval split."""
    total = sum(len(examples) for examples in sets)
    count = math.floor(fraction * total + 0.5)
    if fraction > 0 and total >= 2:
        count = min(max(count, 1), total - 1)
    positions = [(i, j) for i, examples in enumerate(sets) for j in range(len(examples))]
    held = set(random.Random(f"eval/{seed}").sample(positions, count))
    kept = [
        [e for j, e in enumerate(examples) if (i, j) not in held] for i, examples in enumerate(sets)
    ]
    return kept, [sets[i][j] for i, j in sorted(held)]


# ---------------------------------------------------------------- sources


def _read_source(source: DataSource, base_dir: Path, problems: list[DataProblem]) -> list[Example]:
    """Parse one source, appending its problems instead of raising."""
    return list(iter_source(source, base_dir, problems))


def iter_source(
    source: DataSource, base_dir: Path, problems: list[DataProblem]
) -> Iterator[Example]:
    """The examples of one source, one at a time (files are streamed, never held whole).

    Problems are appended to `problems` instead of raised, each file's in file order once the
    file has been read, so that one pass lists everything wrong with the data.
    """
    uri = source.uri
    if uri.startswith("hf://"):
        yield from _read_hub(source, base_dir, problems)
        return
    scheme = _SCHEME.match(uri)
    if scheme and scheme.group(1) != "file":
        problems.append(
            DataProblem(
                uri,
                "",
                "uri",
                f"unsupported scheme {scheme.group(1)}://; use a local path, file://, or hf://",
            )
        )
        return
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.exists():
        problems.append(DataProblem(uri, "", "uri", f"no such file or directory: {path}"))
        return
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            problems.append(
                DataProblem(uri, "", "uri", f"directory {path} has no {'/'.join(DATA_SUFFIXES)}")
            )
    else:
        files = [path]
    for file in files:
        yield from _read_file(file, _display_name(file, base_dir), source, problems)


def _display_name(path: Path, base_dir: Path) -> str:
    """The file as the user wrote it: relative to the YAML's folder where it is inside it."""
    try:
        return str(path.resolve().relative_to(base_dir.resolve()))
    except ValueError:
        return str(path)


def _read_file(
    path: Path, name: str, source: DataSource, problems: list[DataProblem]
) -> Iterator[Example]:
    """Parse one file; its problems are appended in the order they appear in the file."""
    found: list[DataProblem] = []
    try:
        yield from _read_file_records(path, name, source, found)
    except (OSError, UnicodeDecodeError) as err:
        found.append(DataProblem(name, "", "", f"cannot be read: {err}"))
    problems += sorted(found, key=_position)


def _position(problem: DataProblem) -> int:
    """Line or record number of a problem; whole-file problems first."""
    number = problem.location.rpartition(" ")[2]
    return int(number) if number.isdigit() else -1


def _read_file_records(
    path: Path, name: str, source: DataSource, problems: list[DataProblem]
) -> Iterator[Example]:
    data_format = source.format
    if path.suffix == ".txt":
        if data_format not in ("auto", "text", "text_only"):
            problems.append(
                DataProblem(name, "", "format", f"a .txt file is plain text, not {data_format}")
            )
            return
        yield from _read_text(path, name, source.text_split, problems)
    elif path.suffix == ".jsonl":
        records = _jsonl_records(path, name, problems)
        yield from _parse_records(records, name, data_format, None, problems)
    elif path.suffix == ".json":
        opened = _open_json(path, name, problems)
        if opened is not None:
            records, lmflow_type = opened
            yield from _parse_records(records, name, data_format, lmflow_type, problems)
    elif path.suffix in TABLE_SUFFIXES:
        table = _read_table(path, name, problems)
        if table is not None:
            yield from _parse_records(
                _table_records(table, name), name, data_format, None, problems
            )
    else:
        problems.append(
            DataProblem(
                name,
                "",
                "",
                f"unsupported file type {path.suffix!r}: use {', '.join(DATA_SUFFIXES)}",
            )
        )


def _read_text(path: Path, name: str, split: str, problems: list[DataProblem]) -> Iterator[Example]:
    """Plain text split into documents: paragraphs (blank lines), lines, or the whole file."""
    count = 0
    with path.open(encoding="utf-8") as lines:
        if split == "file":
            text = lines.read().strip()
            if text:
                count += 1
                yield Example(text=text, origin=f"{name}:1")
        elif split == "line":
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    count += 1
                    yield Example(text=line.strip(), origin=f"{name}:{number}")
        else:
            paragraph: list[str] = []
            start = 0
            for number, line in enumerate(chain(lines, [""]), start=1):
                if line.strip():
                    start = start if paragraph else number
                    paragraph.append(line.rstrip("\n"))
                elif paragraph:
                    count += 1
                    yield Example(text="\n".join(paragraph).strip(), origin=f"{name}:{start}")
                    paragraph = []
    if not count:
        problems.append(DataProblem(name, "", "", "has no text"))


def _jsonl_records(path: Path, name: str, problems: list[DataProblem]) -> Iterator[RawRecord]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield (f"line {number}", f"{name}:{number}", json.loads(line))
            except json.JSONDecodeError as err:
                problems.append(
                    DataProblem(
                        name,
                        f"line {number}",
                        "",
                        f"not valid JSON: {err.msg} (column {err.colno})",
                    )
                )


def _open_json(
    path: Path, name: str, problems: list[DataProblem]
) -> tuple[Iterator[RawRecord], str | None] | None:
    """Records of a .json file, streamed (a list, or LMFlow's {"type": ..., "instances":
    [...]}), and its LMFlow type; None when the file holds neither or is not JSON."""
    try:
        opened = jsonstream.open_records(path)
    except json.JSONDecodeError as err:
        problems.append(_invalid_json(name, err))
        return None
    if isinstance(opened[0], str):
        problems.append(DataProblem(name, "", *opened))
        return None
    records, lmflow_type = opened

    def numbered() -> Iterator[RawRecord]:
        try:
            for i, record in enumerate(records):
                yield (f"record {i}", f"{name}[{i}]", record)
        except json.JSONDecodeError as err:
            problems.append(_invalid_json(name, err))

    return numbered(), lmflow_type


def _invalid_json(name: str, err: json.JSONDecodeError) -> DataProblem:
    return DataProblem(
        name, f"line {err.lineno}", "", f"not valid JSON: {err.msg} (column {err.colno})"
    )


def _read_table(path: Path, name: str, problems: list[DataProblem]) -> Any:
    """A .parquet, .csv or .arrow file as a memory-mapped `datasets.Dataset`."""
    import datasets  # heavy; only needed for tabular files and hub sources

    try:
        if path.suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path))
        if path.suffix == ".csv":
            # Every cell is text: "4" stays the answer "4", an empty cell stays "".
            with path.open(encoding="utf-8", newline="") as lines:
                header = next(csv.reader(lines), [])
            text = datasets.Features({column: datasets.Value("string") for column in header})
            return datasets.Dataset.from_csv(str(path), features=text, keep_default_na=False)
        return datasets.Dataset.from_file(str(path))
    except Exception as err:  # a corrupt or foreign file: the user's to fix
        problems.append(DataProblem(name, "", "", f"cannot be read as {path.suffix[1:]}: {err}"))
        return None


def _table_records(table: Any, name: str) -> Iterator[RawRecord]:
    for i, row in enumerate(table):
        yield (f"record {i}", f"{name}[{i}]", row)


def _read_hub(source: DataSource, base_dir: Path, problems: list[DataProblem]) -> Iterator[Example]:
    """A hub dataset hf://org/name[@revision], or a local dataset folder written that way."""
    reference = source.uri.removeprefix("hf://")
    name, _, revision = reference.partition("@")
    local = Path(name) if Path(name).is_absolute() else base_dir / name
    import datasets  # heavy; only needed for hub sources

    try:
        if local.is_dir():
            table = datasets.load_dataset(str(local), source.subset, split=source.split)
        else:
            table = datasets.load_dataset(
                name, source.subset, revision=revision or None, split=source.split
            )
    except Exception as err:  # unreachable hub, unknown dataset or split: all the user's to fix
        subset = f" of subset {source.subset!r}" if source.subset else ""
        problems.append(
            DataProblem(source.uri, "", "uri", f"cannot load split {source.split!r}{subset}: {err}")
        )
        return
    records = ((f"record {i}", f"{source.uri}[{i}]", row) for i, row in enumerate(table))
    yield from _parse_records(records, source.uri, source.format, None, problems)


# ---------------------------------------------------------------- records


def _parse_records(
    records: Iterable[RawRecord],
    name: str,
    data_format: str,
    lmflow_type: str | None,
    problems: list[DataProblem],
) -> Iterator[Example]:
    """Detect (or check) the format of a file's records and parse all of them."""
    stream = iter(records)
    head = next(stream, None)
    if head is None:
        problems.append(DataProblem(name, "", "", "has no records"))
        return
    if lmflow_type is not None:
        if lmflow_type not in LMFLOW_TYPES:
            problems.append(
                DataProblem(
                    name,
                    "",
                    "type",
                    f"{lmflow_type!r} is not supported; use one of {', '.join(LMFLOW_TYPES)}",
                )
            )
            return
        if data_format != "auto" and not formats_agree(data_format, lmflow_type):
            problems.append(
                DataProblem(
                    name,
                    "",
                    "type",
                    f"{lmflow_type!r} contradicts the source's format {data_format!r}",
                )
            )
            return
        data_format = lmflow_type if data_format == "auto" else data_format
    elif data_format == "auto":
        location, _, first = head
        detected = detect_format(first)
        if detected is None:
            seen = f"the keys {sorted(first)}" if isinstance(first, dict) else "a non-object"
            problems.append(
                DataProblem(
                    name,
                    location,
                    "",
                    f"cannot detect the format from {seen}; set format to one of "
                    f"{', '.join(KNOWN_FORMATS)}",
                )
            )
            return
        data_format = detected

    for location, origin, record in chain([head], stream):
        example = parse_record(record, data_format, RecordCheck(name, location, problems))
        if example is not None:
            yield _with_origin(example, origin)


def _with_origin(example: Example, origin: str) -> Example:
    return replace(example, origin=origin)
