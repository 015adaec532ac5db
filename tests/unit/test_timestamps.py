"""The operator reads every API timestamp the same way, Time and MicroTime alike."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from lmforge.operator import timestamps


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2026-11-22T02:14:41Z", datetime(2026, 11, 22, 2, 14, 41, tzinfo=UTC)),
        ("2026-11-22T02:14:41.250000Z", datetime(2026, 11, 22, 2, 14, 41, 250000, tzinfo=UTC)),
        ("2026-11-22T03:14:41+01:00", datetime(2026, 11, 22, 2, 14, 41, tzinfo=UTC)),
        (None, None),
        ("", None),
        ("yesterday", None),
    ],
)
def test_parse_reads_time_and_micro_time(stamp: str | None, expected: datetime | None) -> None:
    assert timestamps.parse(stamp) == expected


def test_what_now_writes_parses_back_and_seconds_between_counts_forward() -> None:
    stamp = timestamps.now()
    assert stamp.endswith("Z") and timestamps.parse(stamp) is not None
    assert timestamps.seconds_between("2026-11-22T02:14:41Z", "2026-11-22T02:15:11.5Z") == 30.5
    assert timestamps.seconds_between(None, stamp) == float("inf")
    assert timestamps.seconds_between(stamp, "not a time") == float("inf")
