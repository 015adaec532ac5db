"""The Grafana dashboard (charts/lmforge/files/dashboards/lmforge.json) type-checks against
Grafana's own schema (@grafana/schema, with tsc): the dashboard model, and each panel's
options and field config against its panel plugin's types. No Grafana server can be had
here; tests/integration/test_prometheus.py runs every query on a real Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts/lmforge/files/dashboards/lmforge.json"
PLUGIN_TYPES = "@grafana/schema/dist/esm/raw/composable/{0}/panelcfg/x/{1}PanelCfg_types.gen"
PLUGINS = {"timeseries": "TimeSeries", "stat": "Stat"}
# Custom field config types (stat has none of its own).
FIELD_CONFIG = {"timeseries": "timeseries.FieldConfig", "stat": "Record<string, unknown>"}
# Grafana's types use TypeScript string enums, which JSON spells as plain strings:
# check each such field against the enum's values (a template literal of the enum).
WIRE = """
type Wire<T> = T extends string ? T | `${T}`
  : T extends number | boolean | null | undefined ? T
  : T extends Array<infer U> ? Array<Wire<U>>
  : T extends object ? { [K in keyof T]: Wire<T[K]> }
  : T;
"""


def typescript_for(dashboard: dict) -> str:  # type: ignore[type-arg]
    lines = ["import type { Dashboard, FieldConfigSource } from '@grafana/schema';"]
    lines += [
        f"import type * as {name} from '{PLUGIN_TYPES.format(name, prefix)}';"
        for name, prefix in PLUGINS.items()
    ]
    lines.append(WIRE)
    lines.append(f"export const dashboard: Wire<Dashboard> = {json.dumps(dashboard, indent=1)};")
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        kind, pid = panel["type"], panel["id"]
        assert kind in PLUGINS, f"panel {panel['title']!r}: no types for plugin {kind}"
        lines.append(
            f"export const options{pid}: Wire<Partial<{kind}.Options>> = "
            f"{json.dumps(panel['options'])};"
        )
        lines.append(
            f"export const fieldConfig{pid}: Wire<FieldConfigSource<{FIELD_CONFIG[kind]}>> = "
            f"{json.dumps(panel['fieldConfig'])};"
        )
    return "\n".join(lines) + "\n"


def test_dashboard_type_checks_against_grafana_schema(tools: Path, tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node not found: the dashboard type check needs Node.js and npm"
    modules = tools / "grafana-schema/node_modules"
    assert (modules / "@grafana/schema").is_dir(), "run hack/build-tools.sh (needs npm)"
    (tmp_path / "node_modules").symlink_to(modules)
    (tmp_path / "dashboard.ts").write_text(typescript_for(json.loads(DASHBOARD.read_text())))
    config = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "module": "esnext",
            "moduleResolution": "bundler",
            "target": "es2022",
            "skipLibCheck": True,
            "types": [],
        },
        "files": ["dashboard.ts"],
    }
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    proc = subprocess.run(
        [node, str(modules / "typescript/bin/tsc"), "-p", "tsconfig.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_type_check_catches_a_wrong_field(tools: Path, tmp_path: Path) -> None:
    """The check can fail: a misspelt panel option is an error."""
    dashboard = json.loads(DASHBOARD.read_text())
    panel = next(p for p in dashboard["panels"] if p["type"] == "timeseries")
    panel["options"]["legend"]["placement"] = "left-ish"
    source = typescript_for(dashboard)
    assert "left-ish" in source
    node = shutil.which("node")
    assert node
    modules = tools / "grafana-schema/node_modules"
    (tmp_path / "node_modules").symlink_to(modules)
    (tmp_path / "dashboard.ts").write_text(source)
    proc = subprocess.run(
        [
            node,
            str(modules / "typescript/bin/tsc"),
            "--strict",
            "--noEmit",
            "--module",
            "esnext",
            "--moduleResolution",
            "bundler",
            "--skipLibCheck",
            "dashboard.ts",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "left-ish" in proc.stdout, proc.stdout


def test_every_query_uses_lmforge_metrics_with_the_dashboard_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            # Ours (lmforge_*), or the serving engine's own (vLLM's vllm:*).
            assert re.search(r"\b(lmforge_\w+|vllm:\w+)", expr), (panel["title"], expr)
            for used in re.findall(r"\$(\w+)", expr):
                assert used in names or used.startswith("__"), (panel["title"], used)
