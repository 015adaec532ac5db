"""Pack whole token records into sequences of at most maxSeqLength tokens (the one home of packing).

Best-fit decreasing within bounded windows of records: each window's records, longest first,
go into the open sequence they fill best (the one with the least room left that still fits
them), else into a new one. That comes close to the fewest sequences possible (never more than
11/9 of them, plus one), where packing in stream order leaves a gap in front of every record
that does not fit. Then the sequences are evened out: the shortest length limit that still
gives that number of sequences is used, because a batch is padded to its longest sequence, so
a sequence longer than it needs to be only adds padding to the others.

A record is never split (it was truncated to maxSeqLength before, and counted); each keeps
its own position ids, restarting at 0, which is where the collator's block mask starts a new
record (attention never crosses records). Windows keep memory bounded on any dataset size,
and the result depends on nothing but the records and their order.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

WINDOW = 4096  # records packed together: larger windows fill a little better, cost more memory


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Groups of indices into `lengths`, each group's total at most `capacity` (best fit, longest
    first; ties in index order). Raises ValueError for a length over the capacity."""
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(f"a record of {max(too_long)} tokens does not fit in {capacity}")
    groups: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, group), sorted: best fit = first that fits
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        at = bisect.bisect_left(room, (length, -1))
        if at < len(room):
            left, group = room.pop(at)
        else:
            left, group = capacity, len(groups)
            groups.append([])
        groups[group].append(index)
        if left - length > 0:
            bisect.insort(room, (left - length, group))
    return groups


def plan_sequences(lengths: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """Which records (indices into `lengths`) form each packed sequence, in stream order.

    The fewest sequences best-fit decreasing finds at `max_seq_length`, packed under the
    shortest limit that keeps that count (binary search; only limits checked to give it are
    used). Sequences come in the order of their first record, records in their own order.
    """
    if not lengths:
        return []
    best = best_fit_decreasing(lengths, max_seq_length)
    low = max(max(lengths), -(-sum(lengths) // len(best)))  # no fewer tokens per sequence
    high = max(sum(lengths[i] for i in group) for group in best)
    while low < high:
        middle = (low + high) // 2
        tighter = best_fit_decreasing(lengths, middle)
        if len(tighter) <= len(best):
            best, high = tighter, max(sum(lengths[i] for i in group) for group in tighter)
        else:
            low = middle + 1
    return sorted(sorted(group) for group in best)


@dataclass
class PackingCount:
    """What packing made of the records: sequences, tokens, the longest sequence."""

    sequences: int = 0
    tokens: int = 0
    longest: int = 0

    def add(self, length: int) -> None:
        self.sequences += 1
        self.tokens += length
        self.longest = max(self.longest, length)

    def as_dict(self) -> dict[str, Any]:
        """data-stats.json's packing keys. packing_efficiency: real tokens over all tokens when
        every sequence is padded to the longest one (what a batch holding it computes)."""
        padded = self.sequences * self.longest
        return {
            "packed_sequences": self.sequences,
            "packed_longest": self.longest,
            "packing_efficiency": self.tokens / padded if padded else 0.0,
        }


def pack_records(
    records: Iterable[tuple[Sequence[int], Sequence[int]]],
    max_seq_length: int,
    count: PackingCount | None = None,
    window: int = WINDOW,
) -> Iterator[dict[str, list[int]]]:
    """Packed sequences (input_ids, labels, position_ids) of (ids, labels) records, streamed
    window by window; `count` (when given) adds up what was yielded."""
    buffer: list[tuple[Sequence[int], Sequence[int]]] = []
    for record in records:
        buffer.append(record)
        if len(buffer) == window:
            yield from _pack_window(buffer, max_seq_length, count)
            buffer = []
    yield from _pack_window(buffer, max_seq_length, count)


def _pack_window(
    records: list[tuple[Sequence[int], Sequence[int]]],
    max_seq_length: int,
    count: PackingCount | None,
) -> Iterator[dict[str, list[int]]]:
    for group in plan_sequences([len(ids) for ids, _ in records], max_seq_length):
        sequence: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for index in group:
            ids, labels = records[index]
            sequence["input_ids"] += ids
            sequence["labels"] += labels
            sequence["position_ids"] += range(len(ids))
        if count is not None:
            count.add(len(sequence["input_ids"]))
        yield sequence
