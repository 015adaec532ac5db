"""Benchmark: how fast the operator turns FinetuneJobs into running batch Jobs, at scale.

On the local control plane (etcd, kube-apiserver, controllers, KWOK: pods complete after
about a second), in one run:

1. floor: a bare client applies the children the operator would render for N jobs (run
   config and report ConfigMaps, Service, ServiceAccount, Role, RoleBinding, Job: the same
   renderer's output) with as many threads as the operator has workers;
2. burst: N FinetuneJobs created at once with the operator running; time until every
   child batch Job exists (seen by a watch), as a ratio to the floor; the same until
   every job's first pod exists, in both phases (the job controller creates the pods);
3. steady: jobs created at a steady rate (20/s); p50/p99 latency from creation to the
   child Job, and the operator's API requests per job over whole lifecycles;
4. the operator's peak RSS (VmHWM) at the end;
5. restart: a fresh operator watching every namespace, among all those jobs, given one
   new job: how long until that job's Job exists;
6. rounds: more floor/burst pairs (`--rounds`, default 5 in all), the burst first in
   every second one, each until the Jobs exist; the goal is on the median of the rounds'
   ratios, as one pair moves by half its value when the machine's speed drifts. Each
   round also records the CPU seconds all programs used in either phase;
7. `--profile`: where the API server's CPU went in the first floor and burst, by what it
   did (our custom resources, applies, other patches, watches, Go's garbage collection,
   HTTP and TLS, ...), from its own profiler (/debug/pprof; read with `go tool pprof`).

The floor runs on one fresh control plane and the operator's phases on another, started
after the first is stopped, so neither is charged for the work the other set off; the
floor and the burst each start once the control plane is idle (`control_plane_before`).
Requests the API server served per job (apiserver_request_total, by verb and resource)
are recorded for the floor and burst.

    python -m benchmarks.operator_scale                  # 1000 jobs
    python -m benchmarks.operator_scale --profile        # and the API server's CPU by work
    python -m benchmarks.operator_scale --jobs 200 --steady-seconds 10
    python -m benchmarks.operator_scale --kubeconfig .lmforge/cluster/kubeconfig  # one
                                                        # cluster: settles between phases

Prints a table and writes benchmarks/results/operator_scale.json. Not a test: the
figures depend on the machine; compare the ratio to the floor within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes import config as kube_config

from benchmarks.report import header, machine, publish

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "operator_scale.json"
sys.path.insert(0, str(ROOT / "hack"))

from lmforge.operator.kube import Kube, collection_path  # noqa: E402
from lmforge.operator.ownership import LABEL_KIND, LABEL_NAME  # noqa: E402
from lmforge.operator.settings import OperatorSettings  # noqa: E402
from lmforge.operator.training.render import TrainingTarget, render_children  # noqa: E402

from lmforge.api.kinds import KINDS, TrainingJob  # noqa: E402
from lmforge.api.references import model_references  # noqa: E402

OPERATOR_LOG = ROOT / ".lmforge" / "bench-operator.log"
WORKERS = 8  # the operator's settings.execution.max_workers


def finetune_job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "hf://org/base-model"},
            "dataset": {"sources": [{"uri": "hf://org/dataset"}]},
            "distributed": {"gpusPerNode": 0},  # CPU nodes: 220 pods at once, no GPU queue
        },
    }


def rendered_children(body: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    """What the operator applies for a new job, without owner references (no owner here) and
    without the job-kind label, so that the operator running later ignores these."""
    job = KINDS["FinetuneJob"].model_validate(body)
    assert isinstance(job, TrainingJob)
    uris = {ref.field: ref.source.source or "" for ref in model_references(job.spec)}
    target = TrainingTarget(job, namespace, "00000000-floor", uris, 0, OperatorSettings())
    objects = render_children(target).objects
    for obj in objects:
        obj["metadata"].pop("ownerReferences", None)
        obj["metadata"]["labels"].pop(LABEL_KIND)
    return objects


class JobWatch(threading.Thread):
    """When the first batch Job (or pod, `pods=True`) of each job, by its job-name label,
    appeared, from a watch. Plain JSON, not the client's models: decoding a model costs
    milliseconds an event, which the observer would take from the phase it times."""

    def __init__(self, namespace: str, selector: str, pods: bool) -> None:
        super().__init__(daemon=True)
        self.path = collection_path("Pod" if pods else "Job", namespace)
        self.selector, self.what = selector, "pods" if pods else "Jobs"
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        kube = Kube()
        query = [("labelSelector", self.selector)]
        while not self.stop.is_set():
            listed = kube.request("GET", self.path, query=query)
            now = time.monotonic()
            for item in listed.get("items") or []:
                self.seen.setdefault(item["metadata"]["labels"][LABEL_NAME], now)
            self.ready.set()
            version = listed["metadata"]["resourceVersion"]
            watching = [("watch", "true"), ("resourceVersion", version), ("timeoutSeconds", "30")]
            try:
                for event in kube.stream(self.path, query + watching, 60):
                    labels = event["object"]["metadata"].get("labels") or {}
                    if LABEL_NAME in labels:  # not an ERROR event
                        self.seen.setdefault(labels[LABEL_NAME], time.monotonic())
                    if self.stop.is_set():
                        return
            except Exception:  # a broken connection and the like: list again
                time.sleep(0.2)

    def wait_for(self, count: int, timeout: float) -> float:
        """When the last of `count` jobs' first object appeared; the watch ends."""
        deadline = time.monotonic() + timeout
        try:
            while len(self.seen) < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(self.seen)} of {count} {self.what} after {timeout}s")
                time.sleep(0.05)
            return max(self.seen.values())
        finally:
            self.stop.set()

    def timeline(self, started: float) -> dict[str, float]:
        """Seconds from `started` until 10, 50, 90, 99 and 100 % of the jobs' first objects
        appeared: a slow start or a long tail shows here, not in the last one alone."""
        times = sorted(self.seen.values())
        return {
            f"{round(q * 100)}%": round(times[max(0, int(q * len(times)) - 1)] - started, 1)
            for q in (0.1, 0.5, 0.9, 0.99, 1.0)
        }


# Where the API server's CPU went, by what it was doing: the first matching pattern of a
# sample's call stack (Go function names) names it.
API_SERVER_WORK = (
    ("our custom resources", r"apiextensions-apiserver/pkg/registry/customresource|crdHandler"),
    ("watches served", r"serveWatch|cacheWatcher|WatchServer"),
    ("creates", r"handlers\.createHandler|handlers\.CreateResource|handlers\.CreateNamedResource"),
    ("server-side applies", r"applyPatcher"),
    ("other patches", r"patchResource|PatchResource"),
    ("updates (PUT)", r"handlers\.UpdateResource"),
    ("gets and lists", r"getResourceHandler|ListResource"),
    ("deletes", r"DeleteResource|DeleteCollection"),
    (
        "Go garbage collection",
        r"gcBgMarkWorker|runtime\.gcAssist|runtime\.bgsweep|runtime\.bgscavenge",
    ),
    ("watch cache", r"cacher\.|watchCache|[Rr]eflector"),
    ("etcd client", r"go\.etcd\.io|etcd3"),
    ("metrics", r"prometheus"),
    ("HTTP and TLS", r"net/http|crypto/tls"),
)


def work_of_samples(raw: str) -> dict[str, float]:
    """CPU seconds by API_SERVER_WORK (else "other") from `go tool pprof -raw` text."""
    samples, _, locations = raw.partition("\nLocations\n")
    frames: dict[int, list[str]] = {}
    current = None
    for line in locations.split("\nMappings\n")[0].splitlines():
        located = re.match(r"\s*(\d+): 0x[0-9a-f]+ M=\d+ (\S+)", line)
        if located:
            current = int(located[1])
            frames[current] = [located[2]]
        elif current is not None and line.strip():  # a function inlined there
            frames[current].append(line.split()[0])
    out: dict[str, float] = {}
    for line in samples.splitlines():
        sample = re.match(r"\s*\d+\s+(\d+): (.*)", line)
        if not sample:
            continue
        stack = " ".join(f for i in sample[2].split() for f in frames.get(int(i), []))
        work = next(
            (name for name, pattern in API_SERVER_WORK if re.search(pattern, stack)), "other"
        )
        out[work] = out.get(work, 0.0) + int(sample[1]) / 1e9
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


class ApiServerProfile(threading.Thread):
    """The API server's CPU profile (/debug/pprof, 2-s windows back to back) while a phase
    runs; `stop()` ends it after the window under way and returns its CPU seconds by work.
    Needs Go's pprof (`go tool pprof`, there wherever the control plane was built)."""

    WINDOW = 2

    def __init__(self, kube: Kube) -> None:
        super().__init__(daemon=True)
        self.kube = kube
        self.windows: list[bytes] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            query = [("seconds", str(self.WINDOW))]
            self.windows.append(read(self.kube, "/debug/pprof/profile", query, self.WINDOW + 30))

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, window in enumerate(self.windows):
                paths.append(Path(tmp) / f"{i}.pb.gz")
                paths[-1].write_bytes(window)
            raw = subprocess.run(
                ["go", "tool", "pprof", "-raw", *map(str, paths)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        return work_of_samples(raw)


def create_namespace(kube: Kube, name: str) -> None:
    kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": name}})


def create_jobs(kube: Kube, namespace: str, names: list[str]) -> None:
    path = collection_path("FinetuneJob", namespace)
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda n: kube.request("POST", path, body=finetune_job(n)), names))


def floor(kube: Kube, jobs: int, pods: bool = True, profile: bool = False) -> dict[str, Any]:
    """The bare client's phase; `pods`: also wait until every job's first pod exists;
    `profile`: where the API server's CPU went until the Jobs existed."""
    namespace = f"bench-floor-{os.getpid()}"
    create_namespace(kube, namespace)
    objects = [
        obj
        for i in range(jobs)
        for obj in rendered_children(finetune_job(f"job-{i:04d}"), namespace)
    ]
    # the floor's children carry the job's name but not its kind
    seen = watch_first(namespace, LABEL_NAME)
    first_pods = watch_first(namespace, LABEL_NAME, True) if pods else None
    idle = settle()
    profiler = ApiServerProfile(kube) if profile else None
    started, cpu, requests = time.monotonic(), cpu_by_program(), served(kube)
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(kube.apply, objects))
    last = seen.wait_for(jobs, timeout=1800)
    result = {
        "served_per_job": served_since(kube, requests, jobs),
        "namespace": namespace,
        "seconds": last - started,
        "objects_applied": len(objects),
        "objects_per_job": len(objects) / jobs,
        "cpu_seconds_by_program": cpu_since(cpu),
        "control_plane_before": idle,
    }
    if profiler is not None:
        result["api_server_cpu_by_work"] = profiler.stop()
    return result | pods_and_timeline(seen, first_pods, started, jobs)


def pods_and_timeline(
    seen: JobWatch, pods: JobWatch | None, started: float, jobs: int
) -> dict[str, Any]:
    """The Jobs' timeline; with a watch of pods, once every job's first pod exists: when
    it did, and the pods' timeline."""
    if pods is None:
        return {"timeline": {"Jobs": seen.timeline(started)}}
    return {
        "pods_seconds": pods.wait_for(jobs, timeout=3600) - started,
        "timeline": {"Jobs": seen.timeline(started), "pods": pods.timeline(started)},
    }


def watch_first(
    namespace: str, selector: str = f"{LABEL_KIND}=FinetuneJob", pods: bool = False
) -> JobWatch:
    """A watch of when each job's first Job (or pod) appeared, started and listed."""
    watch = JobWatch(namespace, selector, pods)
    watch.start()
    watch.ready.wait(30)
    return watch


class Operator:
    """`lmforge operator` as a child process, with its metrics endpoint."""

    def __init__(
        self, kubeconfig: Path, log: Path, resync_seconds: float, namespaces: list[str]
    ) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "lmforge"),
                "operator",
                "--identity",
                "bench",
                "--metrics-port",
                str(self.port),
                "--resync-seconds",
                str(resync_seconds),
                *(f"--namespace={namespace}" for namespace in namespaces),
            ],
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while not self._get("/readyz"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"operator not ready; see {log}")
            time.sleep(0.2)

    def _get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return str(r.read().decode())
        except OSError:
            return None

    def total(self, counter: str = "lmforge_api_requests_total") -> float:
        """A counter of the operator's metrics, summed over its labels (API requests)."""
        text = self._get("/metrics") or ""
        found = re.findall(rf"^{counter}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
        return sum(float(v) for v in found)

    def rss_bytes(self, field: str = "VmRSS") -> int:
        """Resident memory now (VmRSS) or at its peak so far (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        return 0

    def peak_rss_bytes(self) -> int:
        return self.rss_bytes("VmHWM")

    def cpu_seconds(self) -> float:
        """User + system CPU time the operator used so far (all its threads)."""
        return process_cpu(Path(f"/proc/{self.proc.pid}/stat").read_text())[1]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def process_cpu(stat: str) -> tuple[str, float]:
    """(program name, user + system CPU seconds) from a /proc/<pid>/stat line."""
    fields = stat.rsplit(")", 1)[1].split()
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    return name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_program() -> dict[str, float]:
    """CPU seconds used so far by every running program, summed by name (kube-apiserver,
    etcd, kwok, python, ...): where a phase's CPU went, by difference."""
    out: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, seconds = process_cpu(stat.read_text())
        except OSError:
            continue  # exited meanwhile
        out[name] = out.get(name, 0.0) + seconds
    return out


def cpu_since(before: dict[str, float]) -> dict[str, float]:
    """CPU seconds per program since `before`, the busiest first (over 0.5 s)."""
    used = {k: v - before.get(k, 0.0) for k, v in cpu_by_program().items()}
    return {k: round(v, 1) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v > 0.5}


def read(
    kube: Kube, path: str, query: list[tuple[str, str]] | None = None, timeout: float = 60
) -> bytes:
    """The body of a GET of the API server that is not a JSON object (metrics, profiles)."""
    prepared = kube.api.param_serialize(
        method="GET", resource_path=path, query_params=query or [], auth_settings=["BearerToken"]
    )
    response = kube.api.call_api(*prepared[:4], _request_timeout=timeout)
    response.read()
    return bytes(response.data)


def served(kube: Kube) -> dict[str, float]:
    """Requests the API server has served so far, by verb and resource
    (apiserver_request_total, every client: the operator, controllers, the benchmark)."""
    out: dict[str, float] = {}
    for labels, value in re.findall(
        r"^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$", read(kube, "/metrics").decode(), re.M
    ):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        sub = found.get("subresource")
        key = f"{found.get('verb')} {found.get('resource')}" + (f"/{sub}" if sub else "")
        out[key] = out.get(key, 0.0) + float(value)
    return out


def served_since(kube: Kube, before: dict[str, float], jobs: int) -> dict[str, float]:
    """Requests per job since `before`, by verb and resource (over 0.05 a job)."""
    now = served(kube)
    per_job = {k: (v - before.get(k, 0.0)) / jobs for k, v in now.items()}
    return {k: round(v, 2) for k, v in sorted(per_job.items(), key=lambda kv: -kv[1]) if v > 0.05}


CONTROL_PLANE = ("kube-apiserver", "kube-controller", "kube-scheduler", "etcd", "kwok")


def settle(idle_cores: float = 0.3, window: float = 5.0, timeout: float = 180) -> dict[str, float]:
    """Wait until the control plane is about idle (under `idle_cores` over `window` s): the
    work a phase set off after its clock stopped (pods of its Jobs created, scheduled,
    completed) must not be charged to the next phase. Returns the seconds waited and the
    cores the control plane used in the last window (pods that cannot start, waiting for
    their volumes, keep the scheduler retrying)."""
    started, cores = time.monotonic(), 0.0
    while time.monotonic() - started < timeout:
        before = cpu_by_program()
        time.sleep(window)
        after = cpu_by_program()
        used = sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(CONTROL_PLANE))
        cores = used / window
        if cores < idle_cores:
            break
    return {"seconds": round(time.monotonic() - started, 1), "control_plane_cores": round(cores, 2)}


def restart(kube: Kube, kubeconfig: Path, log: Path, resync_seconds: float) -> dict[str, Any]:
    """A fresh operator watching the whole cluster (the chart's default) among every object
    the earlier phases left (the burst's and the steady phase's jobs): how long until
    it acts on one new job."""
    namespace = f"bench-restart-{os.getpid()}"
    create_namespace(kube, namespace)
    seen = watch_first(namespace)
    started = time.monotonic()
    operator = Operator(kubeconfig, log, resync_seconds, [])
    try:
        ready = time.monotonic() - started
        create_jobs(kube, namespace, ["job-0000"])
        last = seen.wait_for(1, timeout=1800)
        cpu = operator.cpu_seconds()
    finally:
        seen.stop.set()
        operator.stop()
    return {
        "ready_seconds": ready,
        "first_job_seconds": last - started,
        "operator_cpu_seconds": cpu,
    }


def phases(kube: Kube, namespace: str) -> dict[str, int]:
    items = kube.request("GET", collection_path("FinetuneJob", namespace)).get("items", [])
    counts: dict[str, int] = {}
    for item in items:
        phase = (item.get("status") or {}).get("phase", "None")
        counts[phase] = counts.get(phase, 0) + 1
    return counts


BURST_NAMESPACE, STEADY_NAMESPACE = f"bench-burst-{os.getpid()}", f"bench-steady-{os.getpid()}"


def burst(
    kube: Kube, operator: Operator, jobs: int, pods: bool = True, profile: bool = False
) -> dict[str, Any]:
    namespace = BURST_NAMESPACE
    seen = watch_first(namespace)
    first_pods = watch_first(namespace, pods=True) if pods else None
    idle = settle()
    before, cpu_before, cpu = operator.total(), operator.cpu_seconds(), cpu_by_program()
    reconciles = operator.total("lmforge_reconcile_total")
    requests = served(kube)
    profiler = ApiServerProfile(kube) if profile else None
    started = time.monotonic()
    create_jobs(kube, namespace, [f"job-{i:04d}" for i in range(jobs)])
    created = time.monotonic() - started
    last = seen.wait_for(jobs, timeout=3600)
    result = {
        "namespace": namespace,
        "seconds": last - started,
        "create_seconds": created,
        "requests_per_job": (operator.total() - before) / jobs,
        "reconciles_per_job": (operator.total("lmforge_reconcile_total") - reconciles) / jobs,
        "served_per_job": served_since(kube, requests, jobs),
        # against "seconds": near 1.0 the operator's one interpreter is the bottleneck
        "operator_cpu_seconds": operator.cpu_seconds() - cpu_before,
        "cpu_seconds_by_program": cpu_since(cpu),
        "control_plane_before": idle,
    }
    if profiler is not None:
        result["api_server_cpu_by_work"] = profiler.stop()
    return result | pods_and_timeline(seen, first_pods, started, jobs)


def steady(
    kube: Kube, operator: Operator, rate: float, seconds: float, settle: float
) -> dict[str, Any]:
    namespace = STEADY_NAMESPACE
    seen = watch_first(namespace)
    before = operator.total()
    path = collection_path("FinetuneJob", namespace)
    created: dict[str, float] = {}
    count = int(rate * seconds)
    begin = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        for i in range(count):
            time.sleep(max(0.0, begin + i / rate - time.monotonic()))
            name = f"job-{i:04d}"
            created[name] = time.monotonic()
            pool.submit(kube.request, "POST", path, body=finetune_job(name))
    seen.wait_for(count, timeout=1800)
    latencies = sorted(seen.seen[n] - t for n, t in created.items())
    # requests over lifecycles: until every job finished, or `settle` seconds (the local
    # control plane binds PVCs slowly: its hostPath provisioner, not the operator, is the
    # limit on how fast pods start)
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        done = phases(kube, namespace)
        if done.get("Succeeded", 0) + done.get("Failed", 0) >= count:
            break
        time.sleep(2)
    return {
        "namespace": namespace,
        "jobs": count,
        "rate_per_second": rate,
        "p50_seconds": statistics.median(latencies),
        "p99_seconds": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "max_seconds": latencies[-1],
        "phases": phases(kube, namespace),
        "settle_seconds": settle,
        "requests_per_job_lifecycle": (operator.total() - before) / count,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs applied at once")
    parser.add_argument("--rate", type=float, default=20, help="jobs/s in the steady phase")
    parser.add_argument("--steady-seconds", type=float, default=15)
    parser.add_argument(
        "--settle-seconds", type=float, default=60, help="wait for steady jobs to finish"
    )
    parser.add_argument(
        "--resync-seconds", type=float, default=10, help="the operator's (its default: 10)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="floor/burst pairs, each phase on a fresh control plane, the order alternating "
        "(the box's speed drifts); the goal is on their median ratio",
    )
    parser.add_argument(
        "--kubeconfig", type=Path, help="use this cluster (default: start one; one round)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="the first floor and burst: the API server's CPU by what it did (go tool pprof)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.profile and shutil.which("go") is None:
        parser.error("--profile reads the profiles with `go tool pprof`: Go is not on PATH")
    return run(args)


@contextlib.contextmanager
def control_plane(given: Path | None) -> Iterator[Path]:
    """The kubeconfig of the cluster a phase runs on: `given`, or a fresh local control
    plane (no objects of an earlier run or phase), stopped and wiped afterwards."""
    if given is not None:
        yield given.resolve()
        return
    from cluster import Cluster

    cluster = Cluster(ROOT / ".lmforge" / "bench-cluster")
    cluster.down(quiet=True)
    shutil.rmtree(cluster.root, ignore_errors=True)
    cluster.up()
    try:
        yield cluster.kubeconfig.resolve()
    finally:
        cluster.down()
        shutil.rmtree(cluster.root, ignore_errors=True)


def connect(kubeconfig: Path) -> Kube:
    """A client of the cluster, with our CRDs installed."""
    kube_config.load_kube_config(str(kubeconfig))  # type: ignore[no-untyped-call]
    kubectl = next((Path.home() / ".cache/lmforge/bin").glob("k8s-*")) / "kubectl"
    crds = ROOT / "crds"
    for cmd in (
        ["apply", "--server-side", "--force-conflicts", "-f", str(crds)],
        ["wait", "--for=condition=Established", "--timeout=60s", "-f", str(crds)],
    ):
        subprocess.run([str(kubectl), f"--kubeconfig={kubeconfig}", *cmd], check=True)
    return Kube()


def run(args: argparse.Namespace) -> int:
    binaries = sorted(p.name for p in (Path.home() / ".cache/lmforge/bin").glob("k8s-*"))
    info = machine(
        **{
            "kubernetes-client": client.__version__,
            "control-plane": binaries[-1] if binaries else "?",
        }
    )
    # The floor and the operator's phases each start on a fresh control plane, so neither
    # is charged for work the other set off (a deleted namespace's 2,000 volumes and their
    # pods kept one at half a core for minutes). On a given cluster they share it, and the
    # floor's namespace is deleted and the cluster settles in between.
    with control_plane(args.kubeconfig) as kubeconfig:
        kube = connect(kubeconfig)
        print(f"floor: a bare client applies the children of {args.jobs} jobs ...", flush=True)
        floor_result = floor(kube, args.jobs, profile=args.profile)
        if args.kubeconfig is not None:
            kube.request("DELETE", f"/api/v1/namespaces/{floor_result['namespace']}")
            floor_result["settled_after"] = settle()
    with control_plane(args.kubeconfig) as kubeconfig:
        kube = connect(kubeconfig)
        report, rows = operator_phases(args, kube, kubeconfig, info, floor_result)
    rounds = [_seconds("floor", floor_result) | _seconds("burst", report["burst"])]
    for i in range(1, args.rounds if args.kubeconfig is None else 1):
        print(f"round {i + 1} of {args.rounds} ({'burst' if i % 2 else 'floor'} first) ...")
        rounds.append(another_round(args, burst_first=i % 2 == 1))
    ratios = [r["burst_seconds"] / r["floor_seconds"] for r in rounds]
    for r, ratio in zip(rounds, ratios, strict=True):
        r["ratio"] = ratio
    report["rounds"] = rounds
    report["burst_ratio_median"] = statistics.median(ratios)
    report["goals"] = {"burst_ratio_median": 1.5, "operator_peak_rss_bytes": 200 * 2**20}
    rows[3:3] = [
        ("  by round (floor / operator s: ratio)", "; ".join(_round(r) for r in rounds)),
        ("  median of the rounds (goal <= 1.5)", f"{report['burst_ratio_median']:.2f}"),
        (
            "  CPU-s of all programs by round (floor / operator)",
            "; ".join(f"{r['floor_cpu_seconds']} / {r['burst_cpu_seconds']}" for r in rounds),
        ),
    ]
    if args.profile:
        rows += work_rows(floor_result, report["burst"])
    publish(report, args.out, f"operator_scale: {args.jobs} jobs", rows)
    return 0


def work_rows(floor: dict[str, Any], burst: dict[str, Any]) -> list[tuple[str, str]]:
    """The API server's CPU seconds by work in the first floor and burst, what the burst
    added most first."""
    before, after = floor["api_server_cpu_by_work"], burst["api_server_cpu_by_work"]
    works = sorted(set(before) | set(after), key=lambda w: before.get(w, 0) - after.get(w, 0))
    total = f"{sum(before.values()):.1f} / {sum(after.values()):.1f}"
    return [("API-server CPU-s by work: floor / operator", total)] + [
        (f"  {work}", f"{before.get(work, 0):.1f} / {after.get(work, 0):.1f}") for work in works
    ]


def _round(r: dict[str, float]) -> str:
    return f"{r['floor_seconds']:.1f} / {r['burst_seconds']:.1f}: {r['ratio']:.2f}"


def another_round(args: argparse.Namespace, burst_first: bool) -> dict[str, float]:
    """One more floor/burst pair, each on a fresh control plane; until the Jobs exist
    (the first pair also waited for the pods)."""

    def burst_phase() -> dict[str, float]:
        with control_plane(None) as kubeconfig:
            kube = connect(kubeconfig)
            create_namespace(kube, BURST_NAMESPACE)
            operator = Operator(kubeconfig, OPERATOR_LOG, args.resync_seconds, [BURST_NAMESPACE])
            try:
                return _seconds("burst", burst(kube, operator, args.jobs, pods=False))
            finally:
                operator.stop()

    def floor_phase() -> dict[str, float]:
        with control_plane(None) as kubeconfig:
            return _seconds("floor", floor(connect(kubeconfig), args.jobs, pods=False))

    if burst_first:
        operator_phase = burst_phase()
        return floor_phase() | operator_phase
    return floor_phase() | burst_phase()


def _seconds(phase: str, result: dict[str, Any]) -> dict[str, float]:
    """A round's figures of one phase: its time and the CPU seconds the programs used in it
    (each over 0.5 s; the work done, which does not stretch when the cores sit idle, as
    time does)."""
    return {
        f"{phase}_seconds": float(result["seconds"]),
        f"{phase}_cpu_seconds": round(sum(result["cpu_seconds_by_program"].values()), 1),
    }


def operator_phases(
    args: argparse.Namespace,
    kube: Kube,
    kubeconfig: Path,
    info: dict[str, Any],
    floor_result: dict[str, Any],
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The first round's burst, then the steady and restart phases; the report and its rows."""
    log = OPERATOR_LOG
    log.parent.mkdir(exist_ok=True)
    for namespace in (BURST_NAMESPACE, STEADY_NAMESPACE):
        create_namespace(kube, namespace)
    # The operator watches the namespaces of its jobs (the restart phase: all of them).
    operator = Operator(kubeconfig, log, args.resync_seconds, [BURST_NAMESPACE, STEADY_NAMESPACE])
    rss_at_start = operator.rss_bytes()
    try:
        print(f"burst: {args.jobs} FinetuneJobs at once ...", flush=True)
        burst_result = burst(kube, operator, args.jobs, profile=args.profile)
        print(f"  {json.dumps(burst_result)}; floor {floor_result['seconds']:.1f}s", flush=True)
        burst_result["settled_after"] = settle()
        print(f"steady: {args.rate:g} jobs/s for {args.steady_seconds:g}s ...", flush=True)
        steady_result = steady(kube, operator, args.rate, args.steady_seconds, args.settle_seconds)
        peak_rss, rss_at_end = operator.peak_rss_bytes(), operator.rss_bytes()
    finally:
        operator.stop()
    print("restart: a fresh operator among all those objects, one new job ...", flush=True)
    restart_result = restart(kube, kubeconfig, log, args.resync_seconds)

    ratio = burst_result["seconds"] / floor_result["seconds"]
    report = {
        **header("operator_scale", argv_of(args)),
        "machine": info,
        "jobs": args.jobs,
        "floor": floor_result,
        "burst": burst_result,
        "burst_ratio_to_floor": ratio,
        # the same, until every job's first pod exists (the job controller's pace, both)
        "pods_ratio_to_floor": burst_result["pods_seconds"] / floor_result["pods_seconds"],
        "steady": steady_result,
        "restart": restart_result,
        "operator_peak_rss_bytes": peak_rss,
        "operator_rss_at_start_bytes": rss_at_start,  # ready, no jobs yet
        "operator_rss_at_end_bytes": rss_at_end,  # every job of all phases still there
    }
    rows = [
        ("floor: children of all jobs applied (s)", f"{floor_result['seconds']:.1f}"),
        ("operator: all child Jobs exist (s)", f"{burst_result['seconds']:.1f}"),
        ("  ratio to floor", f"{ratio:.2f}"),
        ("  of which creating the FinetuneJobs (s)", f"{burst_result['create_seconds']:.1f}"),
        (
            "half / 90 % of the Jobs exist: floor; operator (s)",
            "; ".join(
                f"{r['timeline']['Jobs']['50%']} / {r['timeline']['Jobs']['90%']}"
                for r in (floor_result, burst_result)
            ),
        ),
        (
            "every job's first pod exists: floor / operator (s)",
            f"{floor_result['pods_seconds']:.1f} / {burst_result['pods_seconds']:.1f}",
        ),
        ("  ratio", f"{report['pods_ratio_to_floor']:.2f}"),
        ("  API requests per job until its Job exists", f"{burst_result['requests_per_job']:.1f}"),
        ("  operator CPU in that time (s)", f"{burst_result['operator_cpu_seconds']:.1f}"),
        (f"steady {args.rate:g}/s: p50 create->Job (s)", f"{steady_result['p50_seconds']:.2f}"),
        (f"steady {args.rate:g}/s: p99 create->Job (s)", f"{steady_result['p99_seconds']:.2f}"),
        (
            f"steady: API requests per job (+{args.settle_seconds:g} s settle)",
            f"{steady_result['requests_per_job_lifecycle']:.1f}",
        ),
        (
            "restart among them: start -> new job's Job (s)",
            f"{restart_result['first_job_seconds']:.1f}",
        ),
        ("  operator CPU by then (s)", f"{restart_result['operator_cpu_seconds']:.1f}"),
        ("operator peak RSS (MiB, goal <= 200)", f"{peak_rss / 2**20:.0f}"),
        (
            "  at start, no jobs / at the end (MiB)",
            f"{rss_at_start / 2**20:.0f} / {rss_at_end / 2**20:.0f}",
        ),
    ]
    return report, rows


def argv_of(args: argparse.Namespace) -> list[str]:
    out = [
        f"--jobs {args.jobs}",
        f"--rate {args.rate:g}",
        f"--steady-seconds {args.steady_seconds:g}",
        f"--settle-seconds {args.settle_seconds:g}",
        f"--resync-seconds {args.resync_seconds:g}",
        f"--rounds {args.rounds}",
    ]
    return out + ["--profile"] * args.profile


if __name__ == "__main__":
    raise SystemExit(main())
