"""Packing whole records into sequences: fewest sequences, evened out, streamed, masks intact."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from lmforge.trainer.data.collate import block_causal_mask
from lmforge.trainer.data.packing import (
    PackingCount,
    best_fit_decreasing,
    pack_records,
    plan_sequences,
)


def _records(lengths: list[int]) -> list[tuple[list[int], list[int]]]:
    """Record i holds tokens 1000*i + t (so every token says which record it came from)."""
    return [
        ([1000 * i + t for t in range(n)], [-100] + [1000 * i + t for t in range(1, n)])
        for i, n in enumerate(lengths)
    ]


def _in_stream_order(lengths: list[int], size: int) -> int:
    """Sequences that greedy packing in stream order (the old way) makes."""
    sequences, used = 0, size
    for n in lengths:
        if used + n > size:
            sequences, used = sequences + 1, 0
        used += n
    return sequences


def test_known_lengths_reach_the_fewest_sequences() -> None:
    lengths = [6, 5, 4, 5, 6, 4]  # 30 tokens: three full sequences of 10
    assert _in_stream_order(lengths, 10) == 4
    groups = best_fit_decreasing(lengths, 10)
    assert sorted(sum(lengths[i] for i in g) for g in groups) == [10, 10, 10]
    assert len(plan_sequences(lengths, 10)) == 3


def test_demo_length_mix_is_packed_into_the_fewest_sequences_and_evened_out() -> None:
    # The demo data's records (chatml, spell-the-digits task): 18, 20 and 22 tokens. At most
    # three fit in 64, so 1,000 records need at least 334 sequences; the last one aside, every
    # sequence can hold three records in 62 tokens (22 + 22 + 20 = 64 is not needed).
    lengths = [22] * 382 + [20] * 344 + [18] * 274
    random.Random(0).shuffle(lengths)
    groups = plan_sequences(lengths, 64)
    sizes = [sum(lengths[i] for i in g) for g in groups]
    assert len(groups) == 334 < _in_stream_order(lengths, 64)
    assert max(sizes) == 62
    assert sum(lengths) / (len(groups) * max(sizes)) > 0.97


def test_plan_keeps_every_record_once_in_stream_order() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    groups = plan_sequences(lengths, 128)
    assert sorted(i for g in groups for i in g) == list(range(500))
    assert all(sum(lengths[i] for i in g) <= 128 for g in groups)
    assert all(g == sorted(g) for g in groups)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    lower_bound = -(-sum(lengths) // 128)
    assert len(groups) <= lower_bound + 2
    assert len(groups) < _in_stream_order(lengths, 128)


def test_packing_is_deterministic() -> None:
    rng = random.Random(2)
    lengths = [rng.randint(1, 60) for _ in range(300)]
    first = list(pack_records(_records(lengths), 64, window=128))
    again = list(pack_records(_records(lengths), 64, window=128))
    assert first == again
    assert plan_sequences(lengths, 64) == plan_sequences(list(lengths), 64)


def test_no_record_is_split_and_positions_restart_per_record() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(1, 64) for _ in range(200)]
    records = _records(lengths)
    count = PackingCount()
    packed = list(pack_records(records, 64, count, window=50))
    seen = []
    for sequence in packed:
        ids, positions = sequence["input_ids"], sequence["position_ids"]
        assert len(ids) == len(sequence["labels"]) == len(positions) <= 64
        starts = [t for t, p in enumerate(positions) if p == 0] + [len(ids)]
        for start, end in itertools.pairwise(starts):
            record = ids[start] // 1000
            assert (ids[start:end], sequence["labels"][start:end]) == records[record]
            assert positions[start:end] == list(range(end - start))
            seen.append(record)
    assert sorted(seen) == list(range(200))
    assert count.sequences == len(packed) and count.tokens == sum(lengths)
    assert count.longest == max(len(s["input_ids"]) for s in packed)
    stats = count.as_dict()
    assert stats["packing_efficiency"] == sum(lengths) / (len(packed) * count.longest)


def test_windows_bound_what_is_held_and_never_mix() -> None:
    lengths = [5, 3, 2, 4, 6, 1, 7, 3, 8]
    consumed = 0

    def stream() -> Iterator[tuple[list[int], list[int]]]:
        nonlocal consumed
        for record in _records(lengths):
            consumed += 1
            yield record

    sequences = pack_records(stream(), 10, window=3)
    first = next(sequences)
    assert consumed == 3  # the first window is packed before the next record is read
    rest = list(sequences)
    for sequence in [first, *rest]:
        windows = {token // 1000 // 3 for token in sequence["input_ids"]}
        assert len(windows) == 1


def test_a_record_over_the_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="a record of 11 tokens does not fit in 10"):
        plan_sequences([3, 11], 10)
    assert list(pack_records([], 10)) == []


def test_block_mask_of_packed_sequences_stays_inside_records() -> None:
    lengths = [6, 5, 4, 5, 6, 4, 3]
    packed: list[dict[str, Any]] = list(pack_records(_records(lengths), 10))
    rows = [torch.tensor(s["position_ids"]) for s in packed]
    width = max(len(r) for r in rows)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        position_ids[i, : len(row)] = row
    mask = block_causal_mask(position_ids, [len(r) for r in rows])
    for b, sequence in enumerate(packed):
        owner = [token // 1000 for token in sequence["input_ids"]]
        for q in range(len(owner)):
            for k in range(width):
                allowed = k < len(owner) and k <= q and owner[k] == owner[q]
                assert (mask[b, 0, q, k] == 0).item() == allowed, (b, q, k)
