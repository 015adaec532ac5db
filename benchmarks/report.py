"""What every benchmark's results file and table have in common: the machine it ran on,
with the versions that matter to it, a printed table, and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def header(name: str, argv: list[str] | None = None) -> dict[str, Any]:
    """The first fields of a results file: which benchmark, when, and its command line
    (`argv`, or this process's arguments)."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "benchmark": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m", f"benchmarks.{name}", *args]),
    }


def machine(**versions: str) -> dict[str, Any]:
    """The CPU machine (the load at the start says how shared it was) and `versions`."""
    memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_bytes": int(memory) * 1024,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "versions": versions,
    }


def publish(report: dict[str, Any], out: Path, title: str, rows: list[tuple[str, ...]]) -> None:
    """Print `rows` under `title` (first column left, the others right-aligned) and write
    `report` to `out`."""
    widths = [max(len(row[i]) for row in rows if len(row) > i) for i in range(len(rows[0]))]
    print(f"\n{title}")
    for row in rows:
        cells = [f"{row[0]:<{widths[0]}}"] + [
            f"{cell:>{width}}" for cell, width in zip(row[1:], widths[1:], strict=False)
        ]
        print("  " + "  ".join(cells).rstrip())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
