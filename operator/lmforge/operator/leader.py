"""Leader election on a coordination.k8s.io Lease: two replicas never both act.

A replica acts only while it holds the Lease. It renews every third of the
lease duration; if it cannot renew before the lease runs out it stops the
process at once (a replacement waits for the lease to expire, then takes over).
A restarted replica with the same identity takes its own lease back at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException
from lmforge.operator import timestamps
from lmforge.operator.kube import Kube, collection_path, object_path

log = logging.getLogger(__name__)

LEASE_NAME = "lmforge-operator"


def _now() -> datetime:
    return datetime.now(UTC)


class LeaderElection:
    def __init__(self, kube: Kube, namespace: str, identity: str, duration: int = 15) -> None:
        self.kube, self.namespace, self.identity, self.duration = (
            kube,
            namespace,
            identity,
            duration,
        )
        self.leading = threading.Event()

    def try_acquire(self) -> bool:
        """Take or renew the lease when it is free, expired or already ours."""
        lease = self.kube.get("Lease", self.namespace, LEASE_NAME)
        now = _now()
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "renewTime": now.strftime(timestamps.MICRO_TIME),
        }
        try:
            if lease is None:
                spec["acquireTime"] = spec["renewTime"]
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": LEASE_NAME, "namespace": self.namespace},
                    "spec": spec,
                }
                self.kube.request("POST", collection_path("Lease", self.namespace), body=body)
                return True
            current = lease.get("spec", {})
            holder = current.get("holderIdentity")
            renewed = timestamps.parse(current.get("renewTime"))
            expired = renewed is None or now > renewed + timedelta(
                seconds=int(current.get("leaseDurationSeconds") or self.duration)
            )
            if holder not in (None, "", self.identity) and not expired:
                return False
            if holder != self.identity:
                spec["acquireTime"] = spec["renewTime"]
                spec["leaseTransitions"] = int(current.get("leaseTransitions") or 0) + 1
            lease["spec"] = current | spec
            # resourceVersion makes this a compare-and-swap: one of two racing replicas wins.
            self.kube.request("PUT", object_path("Lease", self.namespace, LEASE_NAME), body=lease)
            return True
        except ApiException as err:
            if err.status in (409, 422):
                return False
            raise

    def wait_until_leader(self, poll: float = 2.0) -> None:
        while not self.try_acquire():
            log.info("another replica leads (lease %s/%s); standing by", self.namespace, LEASE_NAME)
            time.sleep(poll)
        log.info("leading as %s", self.identity)
        self.leading.set()
        threading.Thread(target=self._renew_forever, daemon=True, name="lease").start()

    def _renew_forever(self) -> None:
        last_ok = time.monotonic()
        while True:
            time.sleep(self.duration / 3)
            try:
                if self.try_acquire():
                    last_ok = time.monotonic()
                    continue
                log.error("lost the lease to another replica; stopping")
            except Exception as err:  # network trouble: keep trying until the lease runs out
                log.warning("could not renew the lease: %s", err)
                if time.monotonic() - last_ok < self.duration:
                    continue
                log.error("lease expired while renewing failed; stopping")
            self.leading.clear()
            os._exit(3)  # never act without the lease, not even for a moment
