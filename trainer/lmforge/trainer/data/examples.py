"""What every data format is parsed into (`Example`) and how bad data is reported (`DataError`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Problems listed in full in an error message; the rest are counted.
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class Example:
    """One training record, independent of the file format it came from.

    - text formats: `text` is set, everything else is empty.
    - chat formats (SFT): `messages` is the whole conversation, ending with an assistant turn.
    - preference formats: `messages` is the shared prompt; `chosen` / `rejected` are the
      assistant turns that follow it.
    - kto: `messages` is the prompt, `chosen` the completion and `label` whether it is
      desirable.
    - prompt: `messages` is the prompt only (the answer is generated); `columns` holds the
      record's other top-level fields (e.g. a reference `answer` that rewards compare with).
    """

    text: str | None = None
    messages: tuple[dict[str, str], ...] = ()
    tools: tuple[dict[str, Any], ...] = ()
    chosen: tuple[dict[str, str], ...] = ()
    rejected: tuple[dict[str, str], ...] = ()
    label: bool | None = None
    columns: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    origin: str = ""

    @property
    def reference(self) -> str | None:
        """Content of the last assistant message (the expected answer for exact-match eval)."""
        for message in reversed(self.messages + self.chosen):
            if message.get("role") == "assistant":
                return message.get("content")
        return None


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with the data: which file, where in it, which field, and what."""

    file: str
    location: str  # "line 12" (.jsonl), "record 3" (.json, hub datasets) or "" (whole file)
    field: str  # dotted path such as "messages[2].role", or "" for the whole record/file
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.location}" if self.location else self.file
        if self.field:
            return f"{where}: field '{self.field}': {self.message}"
        return f"{where}: {self.message}"


class DataError(Exception):
    """Invalid training data; `problems` lists everything found, not only the first."""

    def __init__(self, problems: list[DataProblem]) -> None:
        self.problems = list(problems)
        super().__init__(self._describe())

    def _describe(self) -> str:
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the training data:"
        lines = [head, *(f"  {p}" for p in self.problems[:MAX_LISTED_PROBLEMS])]
        if count > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {count - MAX_LISTED_PROBLEMS} more problems")
        return "\n".join(lines)
