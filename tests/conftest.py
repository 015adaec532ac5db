"""Shared fixtures. The `kube` fixture brings up a real control plane once per session.

It reuses a running one named by KUBECONFIG (or started by `make cluster-up`);
otherwise it starts its own in .lmforge/test-cluster and stops it afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Some VMs advertise Intel AMX but fault on its instructions: oneDNN's bf16 matmuls die with
# SIGILL (seen on a Firecracker VM, kernel 6.18.44-fc). The tests' bf16 on CPU stands in for
# a GPU's, so oneDNN is capped below AMX here and in every process the tests start.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
sys.path.insert(0, str(ROOT / "hack"))

from cluster import Cluster, build_binaries  # noqa: E402

from tests.kube import Kube  # noqa: E402


def _reachable(kube: Kube) -> bool:
    return kube.run("get", "--raw=/readyz", timeout=10).returncode == 0


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    bin_dir = build_binaries()
    kubectl = bin_dir / "kubectl"
    for candidate in (os.environ.get("KUBECONFIG"), ROOT / ".lmforge/cluster/kubeconfig"):
        if candidate and Path(candidate).exists():
            existing = Kube(kubectl, Path(candidate))
            if _reachable(existing):
                yield existing
                return
    cluster = Cluster(ROOT / ".lmforge/test-cluster")
    cluster.up()
    try:
        yield Kube(kubectl, cluster.kubeconfig)
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def tools() -> Path:
    """Directory with helm and luahealth (hack/build-tools.sh: built once, cached by
    version outside the repo); prometheus and promtool come from the system (Debian)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "hack/build-tools.sh")], capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise RuntimeError(f"hack/build-tools.sh failed:\n{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def crds(kube: Kube) -> Kube:
    """The LMForge CRDs installed (server-side apply, so reruns converge) and Established."""
    kube.run("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"), check=True)
    kube.run(
        "wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds"), check=True
    )
    return kube


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-architecture model with random weights, built locally."""
    from lmforge.trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU tests without CUDA; everything else always runs."""
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
