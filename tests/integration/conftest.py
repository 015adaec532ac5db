"""Fixtures for operator tests: the real `lmforge operator` process against the test cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube import Kube


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """`lmforge operator` as a separate process that tests may kill and restart."""

    def __init__(
        self,
        kube: Kube,
        log_dir: Path,
        identity: str = "pytest-operator",
        *,
        kubeconfig: Path | None = None,
        lease_namespace: str = "default",
    ) -> None:
        self.kube, self.log_dir, self.identity = kube, log_dir, identity
        self.kubeconfig = kubeconfig or kube.kubeconfig  # e.g. one with a ServiceAccount token
        self.lease_namespace = lease_namespace
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_dir / f"operator-{self.identity}-{self.starts}.log", "wb")  # noqa: SIM115
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "lmforge"),
                "operator",
                "--identity",
                self.identity,
                "--lease-namespace",
                self.lease_namespace,
                "--metrics-port",
                str(self.port),
                "--resync-seconds",
                "3",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"operator not ready in {timeout}s; logs in {self.log_dir}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye (what a node failure or OOM kill does)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return str(r.read().decode())


@pytest.fixture(scope="module")
def operator(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """An operator per test module, so that modules which write status by hand (the CRD
    tests) run without one."""
    op = OperatorProcess(crds, tmp_path_factory.mktemp("operator-logs"))
    op.start()
    op.wait_ready()
    yield op
    op.kill()


@pytest.fixture
def namespace(crds: Kube) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    crds.run("create", "namespace", name, check=True)
    yield name
    crds.run("delete", "namespace", name, "--wait=false")


def wait_for(
    check: Callable[[], Any], what: str, timeout: float = 60, interval: float = 0.2
) -> Any:
    """Poll until `check` returns something truthy; fail with `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def status_of(kube: Kube, ns: str, name: str, kind: str = "finetunejob") -> dict[str, Any]:
    return dict(kube.get(kind, name, "-n", ns).get("status") or {})


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), None)


def events_of(kube: Kube, ns: str, name: str) -> list[dict[str, Any]]:
    out = kube.run(
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        f"involvedObject.name={name}",
        "-o",
        "json",
        check=True,
    ).stdout
    return list(json.loads(out)["items"])
