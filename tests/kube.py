"""A thin handle on a real control plane for tests: kubectl with the test kubeconfig."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Kube:
    kubectl_bin: Path
    kubeconfig: Path

    def run(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [
                str(self.kubectl_bin),
                f"--kubeconfig={self.kubeconfig}",
                f"--cache-dir={self.cache_dir}",
                *args,
            ],
            input=input,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    @property
    def cache_dir(self) -> Path:
        return self.kubeconfig.parent / "kubectl-cache"

    def forget_discovery(self) -> None:
        """Drop kubectl's discovery cache, e.g. after new CRDs were installed."""
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def apply(
        self, obj: dict[str, Any] | list[dict[str, Any]], *flags: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        items = obj if isinstance(obj, list) else [obj]
        doc = {"apiVersion": "v1", "kind": "List", "items": items}
        return self.run("apply", *flags, "-f", "-", input=json.dumps(doc), check=check)

    def patch(
        self,
        kind: str,
        name: str,
        namespace: str,
        body: dict[str, Any],
        *,
        subresource: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """A JSON merge patch, optionally on a subresource (status)."""
        extra = [f"--subresource={subresource}"] if subresource else []
        return self.run(
            "patch",
            kind,
            name,
            "-n",
            namespace,
            *extra,
            "--type=merge",
            "-p",
            json.dumps(body),
            check=check,
        )

    def server_dry_run(
        self, obj: dict[str, Any], namespace: str
    ) -> subprocess.CompletedProcess[str]:
        """POST the object to the API server with dryRun=All and strict field validation.

        kubectl's own client-side checks are bypassed: what comes back is the
        API server's verdict (schema, CEL rules, unknown fields).
        """
        group_version = obj["apiVersion"]
        plural = obj["kind"].lower() + "s"
        url = (
            f"/apis/{group_version}/namespaces/{namespace}/{plural}"
            "?dryRun=All&fieldValidation=Strict"
        )
        return self.run("create", "--raw", url, "-f", "-", input=json.dumps(obj))

    def get(self, *args: str) -> dict[str, Any]:
        out = self.run("get", *args, "-o", "json", check=True).stdout
        return dict(json.loads(out))

    def as_service_account(self, namespace: str, account: str, folder: Path) -> Kube:
        """kubectl authenticated only by a token of that ServiceAccount (no admin certs)."""
        token = self.run("create", "token", account, "-n", namespace, check=True).stdout.strip()
        view = json.loads(self.run("config", "view", "--raw", "-o", "json", check=True).stdout)
        cluster = view["clusters"][0]["cluster"]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": account, "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": account}}],
            "current-context": "c",
        }
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{namespace}-{account}.kubeconfig"
        path.write_text(json.dumps(config))
        return Kube(self.kubectl_bin, path)
