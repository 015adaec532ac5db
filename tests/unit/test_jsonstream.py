"""Streaming .json records: the same values as json.loads of the whole file, whatever the
window size, and the same line and column on invalid JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lmforge.trainer.data import jsonstream

RECORDS: list[Any] = [
    {"instruction": 'say "hi" ] }', "input": "", "output": "hi\n[there]{}"},
    {"messages": [{"role": "user", "content": "ünïcode ✓ \\ back\\slash"}], "n": 12345678},
    {"text": "x" * 300, "score": -1.5e-3, "ok": True, "none": None},
    [1, 2, [3, {"a": []}]],
    1234567890123,
]


def read(path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(jsonstream, "CHUNK", chunk)
    opened = jsonstream.open_records(path)
    assert not isinstance(opened[0], str), opened
    records, lmflow_type = opened
    return list(records), lmflow_type


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1 << 20])
def test_records_match_json_loads(
    tmp_path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(RECORDS, indent=2, ensure_ascii=False))
    assert read(listed, chunk, monkeypatch) == (RECORDS, None)
    lmflow = tmp_path / "lmflow.json"
    lmflow.write_text(json.dumps({"type": "text_only", "x": [1, {"y": "]"}], "instances": RECORDS}))
    assert read(lmflow, chunk, monkeypatch) == (RECORDS, "text_only")
    late_type = tmp_path / "late.json"  # read whole: the type is needed first
    late_type.write_text(json.dumps({"instances": RECORDS, "type": "text2text"}))
    assert read(late_type, chunk, monkeypatch) == (RECORDS, "text2text")
    empty = tmp_path / "empty.json"
    empty.write_text(" [ ] ")
    assert read(empty, chunk, monkeypatch) == ([], None)


@pytest.mark.parametrize("chunk", [3, 1 << 20])
@pytest.mark.parametrize(
    "text",
    [
        '[\n  {"a": 1},\n  {"a": 2,,}\n]',
        '[\n  {"a": 1}\n  {"a": 2}\n]',
        '{"type": "conversation",\n "instances": [\n{"a": "unterminated\n]}',
        '[{"a": 1},\n',
        '[{"a": 1}, {"b": "x"}, {"c": tru}]',  # on one line, past the first window
    ],
)
def test_invalid_json_reports_the_files_line_and_column(
    tmp_path: Path, text: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as whole:
        json.loads(text)
    monkeypatch.setattr(jsonstream, "CHUNK", chunk)
    with pytest.raises(json.JSONDecodeError) as streamed:
        opened = jsonstream.open_records(path)
        assert not isinstance(opened[0], str)
        list(opened[0])
    assert (streamed.value.lineno, streamed.value.colno) == (whole.value.lineno, whole.value.colno)


def test_neither_shape_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    path = tmp_path / "scalar.json"
    path.write_text('"just a string"')
    assert jsonstream.open_records(path) == jsonstream.NEITHER
    path.write_text('{"rows": []}')
    assert jsonstream.open_records(path) == jsonstream.NEITHER
    path.write_text('{"type": 3, "instances": []}')
    assert jsonstream.open_records(path) == jsonstream.NO_TYPE
