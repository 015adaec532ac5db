#!/usr/bin/env python3
"""Evaluate the Grafana dashboard's panel queries on a Prometheus, and draw a PNG preview.

The preview is matplotlib, not Grafana (no Grafana server can be had here): one small
chart per panel from the same range queries Grafana would send.

    python hack/dashboard_preview.py --prometheus http://127.0.0.1:9090 \\
        --start 1700000000 --end 1700000300 --out docs/dashboard-preview.png
"""

from __future__ import annotations

import argparse
import json
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts/lmforge/files/dashboards/lmforge.json"
# Series the serving engine's replicas publish (the rest come from the operator and trainers).
ENGINE_METRICS = re.compile(r"\b(lmforge_serving_\w+|vllm:\w+)")


@dataclass
class PanelData:
    title: str
    kind: str
    unit: str
    query: str
    series: list[tuple[str, list[float], list[float]]]  # legend, times, values (NaN dropped)


def as_grafana_would(expr: str, range_seconds: int) -> str:
    """Grafana's variables with the dashboard's defaults (All) and a 1s scrape interval."""
    return (
        expr.replace("$namespace", ".*")
        .replace("$job_name", ".*")
        .replace("$__rate_interval", "15s")
        .replace("$__range", f"{range_seconds}s")
    )


def legend(template: str, labels: dict[str, str]) -> str:
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def query_range(base: str, query: str, start: float, end: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": query, "start": start, "end": end, "step": 1})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.loads(r.read())
    if body["status"] != "success":
        raise RuntimeError(f"{query}: {body}")
    return list(body["data"]["result"])


def query_instant(base: str, query: str, at: float) -> list[dict[str, Any]]:
    """Like query_range, with the one sample in the shape of a range result."""
    params = urllib.parse.urlencode({"query": query, "time": at})
    with urllib.request.urlopen(f"{base}/api/v1/query?{params}", timeout=30) as r:
        body = json.loads(r.read())
    if body["status"] != "success":
        raise RuntimeError(f"{query}: {body}")
    return [{"metric": x["metric"], "values": [x["value"]]} for x in body["data"]["result"]]


def evaluate(
    base: str, start: float, end: float, engine: bool | None = None, dashboard: Path = DASHBOARD
) -> list[PanelData]:
    """The dashboard's queries over [start, end] as Grafana would send them (one PanelData
    per query): all, or only those on the serving engine's series (engine=True), or only
    the others (engine=False)."""
    panels = []
    for panel in json.loads(dashboard.read_text())["panels"]:
        for target in panel.get("targets", []):
            if engine is not None and bool(ENGINE_METRICS.search(target["expr"])) != engine:
                continue
            query = as_grafana_would(target["expr"], int(end - start) + 1)
            series = []
            # An instant target (a stat of the current state) is evaluated at the end only.
            results = (
                query_instant(base, query, end)
                if target.get("instant")
                else query_range(base, query, start, end)
            )
            for result in results:
                points = [(float(t), float(v)) for t, v in result["values"] if v != "NaN"]
                series.append(
                    (
                        legend(target.get("legendFormat", ""), result["metric"]),
                        [t - start for t, _ in points],
                        [v for _, v in points],
                    )
                )
            unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
            panels.append(PanelData(panel["title"], panel["type"], unit, query, series))
    return panels


def draw(panels: list[PanelData], out: Path, source: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 2.8 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.set_title(panel.title, fontsize=9)
        ax.tick_params(labelsize=7)
        if panel.kind == "stat":
            unit = "" if panel.unit == "none" else panel.unit
            text = "\n".join(
                f"{name}: {values[-1]:.3g} {unit}".rstrip()
                for name, _, values in panel.series
                if values
            )
            ax.text(0.5, 0.5, text or "no data", ha="center", va="center", fontsize=9)
            ax.set_axis_off()
            continue
        for name, times, values in panel.series:
            ax.plot(times, values, label=name, linewidth=1)
        ax.set_xlabel("seconds", fontsize=7)
        if panel.unit and panel.unit != "none":
            ax.set_ylabel(panel.unit, fontsize=7)
        if panel.series:
            ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    fig.suptitle(
        "PREVIEW of the LMForge Grafana dashboard's panels, drawn with matplotlib from a real "
        f"Prometheus scrape of {source} (not Grafana)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--start", type=float, required=True)
    parser.add_argument("--end", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", default="LMForge's processes", help="what was scraped")
    args = parser.parse_args()
    draw(evaluate(args.prometheus, args.start, args.end), args.out, args.source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
