#!/usr/bin/env python3
"""A real, local Kubernetes control plane for development and tests.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler on 127.0.0.1,
plus KWOK simulating nodes (some with NVIDIA GPUs) and running pods to
completion. Binaries come from hack/build-control-plane.sh (built from Go
modules, cached outside the repo). Standard library only, so it runs anywhere.

    python hack/cluster.py up   --dir .lmforge/cluster   # idempotent
    python hack/cluster.py down --dir .lmforge/cluster
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# The aggregator's client identity towards extension API servers (front-proxy PKI).
FRONT_PROXY_CA = "/CN=lmforge-front-proxy-ca"
FRONT_PROXY_CLIENT = "front-proxy-client"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@dataclass(frozen=True)
class FakeNode:
    name: str
    cpu: int
    memory: str
    gpus: int = 0
    gpu_product: str = ""

    def manifest(self) -> dict:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
        }
        capacity = {"cpu": str(self.cpu), "memory": self.memory, "pods": "110"}
        spec: dict = {}
        if self.gpus:
            labels |= {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": self.gpu_product,
                "nvidia.com/gpu.count": str(self.gpus),
            }
            capacity["nvidia.com/gpu"] = str(self.gpus)
            spec["taints"] = [GPU_TAINT]
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": labels,
                "annotations": {"kwok.x-k8s.io/node": "fake"},
            },
            "spec": spec,
            "status": {"capacity": capacity, "allocatable": capacity},
        }


NODES = (
    FakeNode("gpu-h100-0", 96, "1536Gi", 8, "NVIDIA-H100-80GB-HBM3"),
    FakeNode("gpu-h100-1", 96, "1536Gi", 8, "NVIDIA-H100-80GB-HBM3"),
    FakeNode("gpu-h100-2", 96, "1536Gi", 8, "NVIDIA-H100-80GB-HBM3"),
    FakeNode("gpu-a10-0", 32, "256Gi", 1, "NVIDIA-A10G"),
    FakeNode("cpu-0", 32, "128Gi"),
    FakeNode("cpu-1", 32, "128Gi"),
)


STORAGE_CLASS = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {
        "name": "standard",
        "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
    },
    "provisioner": "kubernetes.io/host-path",
    "reclaimPolicy": "Delete",
    "volumeBindingMode": "Immediate",
}


class Cluster:
    """One control plane whose state, certificates, logs and pids live in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.kubeconfig = self.root / "kubeconfig"
        self.pki = self.root / "pki"
        self.logs = self.root / "logs"
        self.pids = self.root / "pids"

    # ------------------------------------------------------------ lifecycle

    def up(self) -> None:
        self.bin = build_binaries()
        if self.is_running():
            print(f"cluster already running: KUBECONFIG={self.kubeconfig}")
            return
        self.down(quiet=True)
        start = time.monotonic()
        for d in (self.root, self.logs, self.pids):
            d.mkdir(parents=True, exist_ok=True)
        self._make_pki()
        ports = {name: free_port() for name in ("etcd", "peer", "api", "kcm", "sched", "kwok")}
        (self.root / "ports.json").write_text(json.dumps(ports))
        self._start_etcd(ports)
        self._start_apiserver(ports)
        self._write_kubeconfig(ports["api"])
        self._start_controllers(ports)
        self._add_nodes()
        print(f"cluster up in {time.monotonic() - start:.1f}s: KUBECONFIG={self.kubeconfig}")

    def down(self, quiet: bool = False) -> None:
        if not self.pids.is_dir():
            return
        for name in reversed(COMPONENTS):
            pid_file = self.pids / f"{name}.pid"
            if pid_file.exists():
                stop_process(int(pid_file.read_text()))
                pid_file.unlink()
        if not quiet:
            print("cluster stopped")

    def is_running(self) -> bool:
        if not self.kubeconfig.exists():
            return False
        alive = all(
            (self.pids / f"{c}.pid").exists()
            and pid_alive(int((self.pids / f"{c}.pid").read_text()))
            for c in COMPONENTS
        )
        return alive and self._api_ready(json.loads((self.root / "ports.json").read_text())["api"])

    # ------------------------------------------------------------ components

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [str(self.bin / name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `make cluster-up`
        )
        (self.pids / f"{name}.pid").write_text(str(proc.pid))

    def _start_etcd(self, ports: dict[str, int]) -> None:
        client = f"http://127.0.0.1:{ports['etcd']}"
        self._spawn(
            "etcd",
            [
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls=http://127.0.0.1:{ports['peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['peer']}",
                f"--initial-cluster=default=http://127.0.0.1:{ports['peer']}",
                "--unsafe-no-fsync",  # test data only: trade durability for speed
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
        )
        wait_for(lambda: http_ok(f"{client}/health"), "etcd", self.logs / "etcd.log")

    def _start_apiserver(self, ports: dict[str, int]) -> None:
        pki = self.pki
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ports['api']}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=RBAC",
                # The aggregation layer (APIServices such as a custom metrics API): the
                # client certificate it proxies with, and the headers that carry the user.
                f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
                f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                "--allow-privileged=true",
                "--profiling=true",  # CPU profiles for benchmarks.operator_scale --profile
                "--v=1",
            ],
        )
        wait_for(
            lambda: self._api_ready(ports["api"]),
            "kube-apiserver",
            self.logs / "kube-apiserver.log",
            timeout=120,
        )

    def _start_controllers(self, ports: dict[str, int]) -> None:
        kc = f"--kubeconfig={self.kubeconfig}"
        self._spawn(
            "kube-controller-manager",
            [
                kc,
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['kcm']}",
                f"--service-account-private-key-file={self.pki / 'sa.key'}",
                f"--root-ca-file={self.pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={self.pki / 'ca.crt'}",
                f"--cluster-signing-key-file={self.pki / 'ca.key'}",
                "--leader-elect=false",
                "--controllers=*",
                # KWOK renews the fake nodes' leases; on two busy cores a renewal can come
                # late, and a node marked Unknown marks its pods NotReady for good (KWOK
                # makes a pod Ready once). No test here is about node failure detection.
                "--node-monitor-grace-period=10m",
                # Dynamic provisioning for PVCs without a storage system: hostPath
                # volumes under /tmp, for testing only (see the default StorageClass).
                "--enable-hostpath-provisioner=true",
                # HorizontalPodAutoscalers act within seconds, not minutes (defaults: a 15 s
                # sync and a 5-minute window before scaling down), so tests can watch them.
                "--horizontal-pod-autoscaler-sync-period=2s",
                "--horizontal-pod-autoscaler-downscale-stabilization=4s",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                kc,
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['sched']}",
                "--leader-elect=false",
                "--v=1",
            ],
        )
        self._spawn(
            "kwok",
            [
                kc,
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--disregard-status-with-annotation-selector=kwok.x-k8s.io/status=custom",
                "--cidr=10.0.0.1/24",
                "--node-ip=10.0.0.1",
                f"--server-address=127.0.0.1:{ports['kwok']}",
                f"--config={HERE / 'kwok' / 'pod-stages.yaml'}",
            ],
        )

    def _add_nodes(self) -> None:
        items: list[dict] = [n.manifest() for n in NODES] + [STORAGE_CLASS]
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )
        self.kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=90s")
        # Pods need the default ServiceAccount, which the controller manager creates.
        wait_for(
            lambda: self.kubectl("get", "serviceaccount", "default", check=False) == 0,
            "default ServiceAccount",
            self.logs / "kube-controller-manager.log",
        )

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> int:
        proc = subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            text=True,
            capture_output=True,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc.returncode

    # ------------------------------------------------------------ credentials

    def _make_pki(self) -> None:
        """The cluster CA with the API server's serving and the admin's client certificate,
        the service-account key pair, and a separate front-proxy CA whose client
        certificate the API server's aggregator presents to extension API servers (e.g. a
        custom metrics API), which trust requests carrying it. Files already there are
        kept, so a state folder from an older version only gains what it lacks."""
        pki = self.pki
        pki.mkdir(parents=True, exist_ok=True)

        def ssl_(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)

        for ca, subject in (("ca", "/CN=lmforge-local-ca"), ("front-proxy-ca", FRONT_PROXY_CA)):
            if not (pki / f"{ca}.crt").exists():
                ssl_(
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    f"{ca}.key",
                    "-out",
                    f"{ca}.crt",
                    "-days",
                    "3650",
                    "-subj",
                    subject,
                )
        certs = {
            "apiserver": (
                "ca",
                "/CN=kube-apiserver",
                "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,"
                "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
                "extendedKeyUsage=serverAuth",
            ),
            "admin": ("ca", "/O=system:masters/CN=lmforge-admin", "extendedKeyUsage=clientAuth"),
            "front-proxy-client": (
                "front-proxy-ca",
                f"/CN={FRONT_PROXY_CLIENT}",
                "extendedKeyUsage=clientAuth",
            ),
        }
        for name, (ca, subject, ext) in certs.items():
            if (pki / f"{name}.crt").exists():
                continue
            (pki / f"{name}.ext").write_text(ext + "\n")
            ssl_(
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                f"{name}.key",
                "-out",
                f"{name}.csr",
                "-subj",
                subject,
            )
            ssl_(
                "x509",
                "-req",
                "-in",
                f"{name}.csr",
                "-CA",
                f"{ca}.crt",
                "-CAkey",
                f"{ca}.key",
                "-CAcreateserial",
                "-out",
                f"{name}.crt",
                "-days",
                "3650",
                "-extfile",
                f"{name}.ext",
            )
        if not (pki / "sa.pub").exists():
            ssl_("genrsa", "-out", "sa.key", "2048")
            ssl_("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")

    def _write_kubeconfig(self, port: int) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "lmforge-local",
                    "cluster": {
                        "server": f"https://127.0.0.1:{port}",
                        "certificate-authority": str(self.pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "lmforge-admin",
                    "user": {
                        "client-certificate": str(self.pki / "admin.crt"),
                        "client-key": str(self.pki / "admin.key"),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "lmforge-local",
                    "context": {
                        "cluster": "lmforge-local",
                        "user": "lmforge-admin",
                        "namespace": "default",
                    },
                }
            ],
            "current-context": "lmforge-local",
        }
        tmp = self.kubeconfig.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        tmp.replace(self.kubeconfig)

    def _api_ready(self, port: int) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return http_ok(f"https://127.0.0.1:{port}/readyz", ctx)


# ---------------------------------------------------------------- process helpers


def build_binaries() -> Path:
    out = subprocess.run(
        ["bash", str(HERE / "build-control-plane.sh")],
        check=True,
        text=True,
        stdout=subprocess.PIPE,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def stop_process(pid: int, grace: float = 10) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not pid_alive(pid):
                return
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def wait_for(ok, what: str, log: Path, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise RuntimeError(f"{what} did not become ready in {timeout:.0f}s; last log lines:\n{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=".lmforge/cluster", help="state folder")
    parser.add_argument("--crds", help="folder of CRDs to install once the cluster is up")
    args = parser.parse_args()
    cluster = Cluster(Path(args.dir))
    if args.action == "up":
        cluster.up()
        if args.crds:
            cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", args.crds)
            cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", args.crds)
            print(f"installed the CRDs from {args.crds}")
        print(f"kubectl built for this cluster: {cluster.bin / 'kubectl'}")
    elif args.action == "down":
        cluster.down()
    else:
        running = cluster.is_running()
        print("running" if running else "stopped")
        sys.exit(0 if running else 1)


if __name__ == "__main__":
    main()
