"""operator_scale --profile: the API server's CPU by what it did, from Go's own profiler."""

from __future__ import annotations

import time

from kubernetes import client, config
from lmforge.operator.kube import Kube as OperatorKube

from benchmarks.operator_scale import API_SERVER_WORK, ApiServerProfile, work_of_samples
from tests.kube import Kube

# `go tool pprof -raw` of a made-up profile: three samples of 10 ms, one of 20 ms; frame 3
# has a function inlined into it (the line without a location number).
RAW = """PeriodType: cpu nanoseconds
Period: 10000000
Samples:
samples/count cpu/nanoseconds
          2   20000000: 1 2
          1   10000000: 3
          1   10000000: 4 2
Locations
     1: 0x11 M=1 k8s.io/apiserver/pkg/endpoints/handlers.(*applyPatcher).applyPatch a.go:1:0 s=0
     2: 0x12 M=1 net/http.HandlerFunc.ServeHTTP b.go:2:0 s=0
     3: 0x13 M=1 runtime.mallocgc c.go:3:0 s=0
             runtime.gcAssistAlloc c.go:4:0 s=0
     4: 0x14 M=1 main.somethingElse d.go:5:0 s=0
Mappings
1: 0x0/0x100/0x0 kube-apiserver
"""


def test_each_sample_counts_once_for_the_first_work_its_stack_names() -> None:
    work = work_of_samples(RAW)
    # the apply outranks HTTP under it; the inlined GC frame counts; the rest is HTTP
    assert work == {
        "server-side applies": 0.02,
        "Go garbage collection": 0.01,
        "HTTP and TLS": 0.01,
    }


def test_the_local_api_server_is_profiled_while_it_works(kube: Kube) -> None:
    configuration = client.Configuration()
    config.load_kube_config(str(kube.kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
    api = OperatorKube(client.ApiClient(configuration))
    profile = ApiServerProfile(api)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # work to profile: lists from etcd
        api.request("GET", "/api/v1/namespaces/kube-system/configmaps")
    work = profile.stop()
    assert len(profile.windows) >= 2  # back to back until stopped
    assert sum(work.values()) > 0.05
    assert set(work) <= {name for name, _ in API_SERVER_WORK} | {"other"}
    assert work.get("gets and lists", 0) > 0
