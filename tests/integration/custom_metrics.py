"""A custom metrics API (`custom.metrics.k8s.io/v1beta2`) served from the test process, so
that a HorizontalPodAutoscaler on a Pods metric acts on a load the test sets.

It plays what a metrics adapter (prometheus-adapter, KEDA) is to the HPA controller, and
nothing is faked on the Kubernetes side: the controller asks the API server for
`/apis/custom.metrics.k8s.io/v1beta2/namespaces/NS/pods/*/METRIC?labelSelector=SEL`, the
API server's aggregator proxies that (authenticated with its front-proxy client
certificate, which this server requires) to this HTTPS server on 127.0.0.1, registered by
an APIService whose Service is an ExternalName of 127.0.0.1 (the aggregator resolves an
ExternalName Service to its name and the APIService's port, so all traffic stays on the
loopback). The answer spreads the test's total load (requests running + waiting) evenly
over the running pods the selector matches, as a Service spreading requests would.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import threading
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.kube import Kube

GROUP, VERSION = "custom.metrics.k8s.io", "v1beta2"
API_SERVICE = f"{VERSION}.{GROUP}"
SERVICE_NAMESPACE, SERVICE_NAME = "kube-system", "lmforge-test-custom-metrics"


@dataclass(frozen=True)
class MetricRequest:
    """One question the API server forwarded: who asked, for which metric of which pods."""

    user: str
    namespace: str
    metric: str
    label_selector: str


class CustomMetricsAPI:
    """The HTTPS server, its APIService registration and the loads it reports."""

    def __init__(self, kube: Kube, folder: Path) -> None:
        self.kube, self.folder = kube, folder
        self.requests: list[MetricRequest] = []
        self._loads: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ the test's side

    def set_load(self, namespace: str, metric: str, total: float) -> None:
        """Requests running + waiting across all pods of `metric` in `namespace`."""
        with self._lock:
            self._loads[(namespace, metric)] = total

    def requests_for(self, namespace: str) -> list[MetricRequest]:
        with self._lock:
            return [r for r in self.requests if r.namespace == namespace]

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        auth = self.kube.get("configmap", "extension-apiserver-authentication", "-n", "kube-system")
        data = auth.get("data") or {}
        if "requestheader-client-ca-file" not in data:
            raise AssertionError(
                "the API server has no front-proxy (requestheader) configuration, so its "
                "aggregator cannot reach extension APIs; restart the test cluster with the "
                "current hack/cluster.py (make cluster-down cluster-up)"
            )
        allowed = set(json.loads(data.get("requestheader-allowed-names") or "[]"))
        cert, key = self._serving_certificate()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.verify_mode = ssl.CERT_REQUIRED  # only the aggregator may ask
        context.load_verify_locations(cadata=data["requestheader-client-ca-file"])
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, allowed))
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        port = self._server.server_address[1]
        self.kube.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": SERVICE_NAME, "namespace": SERVICE_NAMESPACE},
                    "spec": {"type": "ExternalName", "externalName": "127.0.0.1"},
                },
                {
                    "apiVersion": "apiregistration.k8s.io/v1",
                    "kind": "APIService",
                    "metadata": {"name": API_SERVICE},
                    "spec": {
                        "group": GROUP,
                        "version": VERSION,
                        "service": {
                            "namespace": SERVICE_NAMESPACE,
                            "name": SERVICE_NAME,
                            "port": port,
                        },
                        "caBundle": base64.b64encode(Path(cert).read_bytes()).decode(),
                        "groupPriorityMinimum": 100,
                        "versionPriority": 100,
                    },
                },
            ]
        )
        self.kube.run(
            "wait",
            "--for=condition=Available",
            f"apiservice/{API_SERVICE}",
            "--timeout=60s",
            check=True,
        )

    def stop(self) -> None:
        """Unregister first: an APIService nobody answers breaks discovery for everyone
        (namespace deletion and garbage collection included)."""
        self.kube.run("delete", "apiservice", API_SERVICE, "--ignore-not-found")
        self.kube.run(
            "delete", "service", SERVICE_NAME, "-n", SERVICE_NAMESPACE, "--ignore-not-found"
        )
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _serving_certificate(self) -> tuple[str, str]:
        """A self-signed certificate for the name the aggregator checks (service.ns.svc)."""
        cert, key = self.folder / "metrics.crt", self.folder / "metrics.key"
        host = f"{SERVICE_NAME}.{SERVICE_NAMESPACE}.svc"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "1",
                "-subj",
                f"/CN={host}",
                "-addext",
                f"subjectAltName=DNS:{host}",
            ],
            check=True,
            capture_output=True,
        )
        return str(cert), str(key)

    # ------------------------------------------------------------ answers

    def answer(self, path: str, query: dict[str, list[str]], user: str) -> tuple[int, Any]:
        base = f"/apis/{GROUP}/{VERSION}"
        if path == base:  # discovery (the aggregator's availability check and the HPA's)
            return 200, {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": f"{GROUP}/{VERSION}",
                "resources": [
                    {
                        "name": f"pods/{metric}",
                        "singularName": "",
                        "namespaced": True,
                        "kind": "MetricValueList",
                        "verbs": ["get"],
                    }
                    for metric in sorted({m for _, m in self._loads})
                ],
            }
        parts = path.removeprefix(base + "/").split("/")
        if not path.startswith(base + "/") or len(parts) != 5 or parts[0] != "namespaces":
            return 404, _status(404, "NotFound", f"no such path {path}")
        _, namespace, resource, name, metric = parts
        selector = (query.get("labelSelector") or [""])[0]
        with self._lock:
            self.requests.append(MetricRequest(user, namespace, metric, selector))
            load = self._loads.get((namespace, metric))
        if resource != "pods" or name != "*":
            return 404, _status(404, "NotFound", f"only pods/*/METRIC is served, not {path}")
        if load is None:
            return 404, _status(404, "NotFound", f"metric {metric} not found in {namespace}")
        pods = self.kube.get("pods", "-n", namespace, "-l", selector)["items"]
        running = [
            p["metadata"]["name"]
            for p in pods
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        ]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        per_pod = f"{round(1000 * load / max(1, len(running)))}m"
        return 200, {
            "kind": "MetricValueList",
            "apiVersion": f"{GROUP}/{VERSION}",
            "metadata": {},
            "items": [
                {
                    "describedObject": {
                        "kind": "Pod",
                        "namespace": namespace,
                        "name": pod,
                        "apiVersion": "/v1",
                    },
                    "metric": {"name": metric},
                    "timestamp": now,
                    "windowSeconds": 30,
                    "value": per_pod,
                }
                for pod in running
            ],
        }


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


def _handler(api: CustomMetricsAPI, allowed_names: set[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            peer = self.connection.getpeercert() or {}  # type: ignore[attr-defined]
            names = {v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"}
            if allowed_names and not names & allowed_names:
                self._send(403, _status(403, "Forbidden", f"client {names} is not allowed"))
                return
            url = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(url.path).rstrip("/")
            user = self.headers.get("X-Remote-User", "")
            code, body = api.answer(path, urllib.parse.parse_qs(url.query), user)
            self._send(code, body)

        def _send(self, code: int, body: Any) -> None:
            payload = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the recorded requests say what was asked

    return Handler
