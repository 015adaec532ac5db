"""Kubernetes API timestamps: the operator's one place to write and read them.

The API server writes `Time` fields (creationTimestamp, lastTransitionTime) as RFC 3339
in UTC with whole seconds, and `MicroTime` fields (a Lease's renewTime) with microseconds.
"""

from __future__ import annotations

from datetime import UTC, datetime

MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"


def now() -> str:
    """The current time as a `Time` field."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(stamp: str | None) -> datetime | None:
    """A `Time` or `MicroTime` field as an aware datetime; None when missing or malformed."""
    if not stamp:
        return None
    try:
        parsed = datetime.fromisoformat(str(stamp))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def seconds_between(start: str | None, end: str | None) -> float:
    """Seconds from one timestamp to another; infinite when either is missing or malformed."""
    first, last = parse(start), parse(end)
    if first is None or last is None:
        return float("inf")
    return (last - first).total_seconds()
