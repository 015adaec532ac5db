"""Reading a large .json file record by record: a top-level list of records, or LMFlow's
{"type": ..., "instances": [...]}, without holding the whole file (BELLE-sized .json
files are tens of GB).

`JsonStream` keeps a window of the file: values are decoded with `json.JSONDecoder.raw_decode`
from the window, which drops what has been read and grows only while one value runs past
its end.
Errors carry the file's line and column, as `json.loads` of the whole file would report them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

CHUNK = 1 << 20  # characters read at a time
_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder()


class JsonStream:
    """A window over a JSON text file that decodes one value at a time."""

    def __init__(self, file: TextIO, chunk: int = CHUNK) -> None:
        self.file, self.chunk = file, chunk
        self.window = ""
        self.at = 0  # position in the window
        self.lines_before = 0  # newlines in the text dropped before the window
        self.column_before = 0  # characters of the window's first line dropped before it
        self.eof = False

    def _more(self, at_least: int = 0) -> bool:
        """Drop what has been read, read more of the file into the window; False at the
        end of the file."""
        if self.eof:
            return False
        text = self.file.read(max(self.chunk, at_least))
        if not text:
            self.eof = True
            return False
        dropped = self.window[: self.at]
        newlines = dropped.count("\n")
        if newlines:
            self.lines_before += newlines
            self.column_before = len(dropped) - dropped.rfind("\n") - 1
        else:
            self.column_before += len(dropped)
        self.window = self.window[self.at :] + text
        self.at = 0
        return True

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file), not consumed."""
        while True:
            while self.at < len(self.window) and self.window[self.at] in _WHITESPACE:
                self.at += 1
            if self.at < len(self.window):
                return self.window[self.at]
            if not self._more():
                return ""

    def expect(self, char: str) -> None:
        found = self.peek()
        if found != char:
            raise self.error(f"Expecting {char!r}" if found else "Unexpected end of file")
        self.at += 1

    def value(self) -> Any:
        """Decode the next value; the window grows until the value fits in it."""
        self.peek()
        while True:
            try:
                found, end = _DECODER.raw_decode(self.window, self.at)
            except json.JSONDecodeError as err:
                # Cut short by the window's end, or really invalid: read more to tell.
                if self._more(len(self.window)):
                    continue
                raise self.error(err.msg, err.pos) from None
            number = isinstance(found, (int, float))
            if number and end == len(self.window) and self._more():
                continue  # a number may go on in the next chunk
            self.at = end
            return found

    def error(self, message: str, pos: int | None = None) -> json.JSONDecodeError:
        """A JSONDecodeError whose line and column are the file's."""
        pos = self.at if pos is None else pos
        line = self.lines_before + self.window.count("\n", 0, pos) + 1
        start = self.window.rfind("\n", 0, pos)
        column = pos - start if start >= 0 else self.column_before + pos + 1
        err = json.JSONDecodeError(message, self.window, pos)
        err.lineno, err.colno = line, column
        return err

    def items(self) -> Iterator[Any]:
        """The values of a list (after its '['), one at a time, through its ']'."""
        if self.peek() == "]":
            self.at += 1
            return
        while True:
            yield self.value()
            if self.peek() == ",":
                self.at += 1
                continue
            self.expect("]")
            return


Records = tuple[Iterator[Any], str | None]  # the records, and the LMFlow type or None
Problem = tuple[str, str]  # field, message
NEITHER = ("", 'must hold a list of records or {"type": ..., "instances": [...]}')
NO_TYPE = ("type", "missing (LMFlow files name their type)")


def open_records(path: Path) -> Records | Problem:
    """A .json file's records as a stream, and its LMFlow type (None for a plain list).

    Returns (field, message) instead when the file holds neither shape; raises JSONDecodeError
    (with the file's line and column) on invalid JSON, also while the records are read.
    An LMFlow file whose "type" comes after its "instances" is read whole (the type is
    needed before the records).
    """
    file = path.open(encoding="utf-8")
    stream = JsonStream(file)
    first = stream.peek()
    if first == "[":
        stream.at += 1
        return _closing(stream.items(), file), None
    if first != "{":
        file.close()
        if first == "":
            raise stream.error("Expecting value")
        return NEITHER
    stream.at += 1
    lmflow_type: Any = None
    while stream.peek() != "}":
        key = stream.value()
        stream.expect(":")
        if key == "instances":
            if lmflow_type is None or stream.peek() != "[":
                file.close()
                return _whole(path)
            stream.at += 1
            if not isinstance(lmflow_type, str):
                file.close()
                return NO_TYPE
            return _closing(stream.items(), file), lmflow_type
        value = stream.value()
        if key == "type":
            lmflow_type = value
        if stream.peek() == ",":
            stream.at += 1
    file.close()
    return NEITHER


def _whole(path: Path) -> Records | Problem:
    data = json.loads(path.read_text(encoding="utf-8"))
    lmflow_type = data.get("type")
    if not isinstance(lmflow_type, str):
        return NO_TYPE
    if not isinstance(data["instances"], list):
        return ("instances", "must be a list of records")
    return iter(data["instances"]), lmflow_type


def _closing(items: Iterator[Any], file: TextIO) -> Iterator[Any]:
    try:
        yield from items
    finally:
        file.close()
