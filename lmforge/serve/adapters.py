"""Keeping the desired adapters loaded: a pure plan, and the engine calls that carry it out.

The desired set (`AdapterSet`, a file the operator keeps in a ConfigMap) says which adapters
should be served under which names; the engine says which are loaded (`/v1/models`). The
plan loads what is missing, unloads what is no longer wanted, and reloads an adapter whose
files moved (unload, then load: `load_inplace` would change weights under running streams).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.api.servingconfig import AdapterSet, DesiredAdapter


@dataclass(frozen=True)
class Plan:
    """What to do to get from the loaded set to the desired set."""

    load: list[DesiredAdapter]
    unload: list[str]
    pending: list[DesiredAdapter]  # desired, but its files are not there (yet)


def plan_sync(
    desired: list[DesiredAdapter],
    loaded: dict[str, str],
    present: set[str],
    failed: frozenset[str] | set[str] = frozenset(),
) -> Plan:
    """`loaded` maps served adapter names to their paths; `present` is the desired paths
    that exist; `failed` the names whose current path the engine rejected (not retried)."""
    wanted = {a.name: a for a in desired}
    unload = [
        name
        for name, path in sorted(loaded.items())
        if name not in wanted or wanted[name].path != path
    ]
    load: list[DesiredAdapter] = []
    pending: list[DesiredAdapter] = []
    for adapter in desired:
        if loaded.get(adapter.name) == adapter.path or adapter.name in failed:
            continue
        (load if adapter.path in present else pending).append(adapter)
    return Plan(load, unload, pending)


def read_adapter_set(path: Path) -> AdapterSet:
    """The desired set; an absent file is an empty set (a service without adapters)."""
    if not path.exists():
        return AdapterSet()
    return AdapterSet.model_validate_json(path.read_text())


class EngineError(Exception):
    """The engine refused a request (status >= 400) or could not be reached (status 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def rejected(self) -> bool:
        """The request itself was wrong (retrying it unchanged cannot help)."""
        return 400 <= self.status < 500


class EngineClient:
    """The few engine endpoints the supervisor uses (HTTP on the loopback)."""

    def __init__(self, base_url: str, timeout: float = 30) -> None:
        self.base_url, self.timeout = base_url.rstrip("/"), timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data else {},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise EngineError(err.code, f"{method} {path}: {err.code} {detail}") from err
        except OSError as err:
            raise EngineError(0, f"{method} {path}: {err}") from err
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode(errors="replace")

    def healthy(self) -> bool:
        try:
            self._call("GET", "/health")
        except EngineError:
            return False
        return True

    def loaded_adapters(self, base: str) -> dict[str, str]:
        """Served adapter names -> their paths (`/v1/models` entries with a parent)."""
        models = self._call("GET", "/v1/models")["data"]
        return {m["id"]: m.get("root", "") for m in models if m.get("parent") and m["id"] != base}

    def load(self, adapter: DesiredAdapter) -> None:
        self._call(
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": adapter.name, "lora_path": adapter.path},
        )

    def unload(self, name: str) -> None:
        self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})

    def probe(self, model: str) -> None:
        """One generated token from `model`: proves it answers."""
        self._call("POST", "/v1/completions", {"model": model, "prompt": "a", "max_tokens": 1})
