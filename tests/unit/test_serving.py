"""Serving, pure parts: the serving config and engine flags, the adapter plan, readiness,
the per-adapter metrics middleware, the operator's renderers and the status it derives."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

import pytest
from lmforge.operator.serving.lifecycle import AdapterRef, ServingObserved, decide_status
from lmforge.operator.serving.render import (
    ServingTarget,
    desired_adapters,
    render_children,
    replicas_handover,
)
from prometheus_client import REGISTRY

from lmforge.api.kinds import AutoscalingSpec, InferenceService
from lmforge.api.servingconfig import DesiredAdapter, resolve_serving_config
from lmforge.api.validation import load_file, parse_object
from lmforge.serve.adapters import plan_sync
from lmforge.serve.engine import engine_command, engine_env
from lmforge.serve.middleware import ServingMiddleware, readiness
from lmforge.serve.supervisor import Supervisor

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def service(**spec: Any) -> InferenceService:
    body = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "chat"},
        "spec": {"model": {"source": "pvc://models/base"}, **spec},
    }
    obj = parse_object(body)
    assert isinstance(obj, InferenceService)
    return obj


# ---------------------------------------------------------------- engine flags


def test_engine_flags_follow_the_spec() -> None:
    svc = service(
        gpusPerReplica=2,
        serving={
            "dtype": "bfloat16",
            "maxModelLen": 4096,
            "quantization": "awq",
            "tensorParallel": 2,
            "maxLoraRank": 32,
            "speculative": {"draftModel": {"source": "pvc://models/draft"}, "numTokens": 3},
        },
    )
    config = resolve_serving_config(
        svc, model="/m", draft_model="/d", adapters_file="/a.json", state_file="/s.json"
    )
    cmd = engine_command(config, "python", Path("/t.jinja"))
    flags = dict(itertools.pairwise(cmd))
    assert cmd[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flags["--model"] == "/m" and flags["--served-model-name"] == "chat"
    assert flags["--dtype"] == "bfloat16" and flags["--max-model-len"] == "4096"
    assert flags["--quantization"] == "awq" and flags["--tensor-parallel-size"] == "2"
    assert flags["--max-lora-rank"] == "32" and "--enable-lora" in cmd
    assert json.loads(flags["--speculative-config"]) == {
        "model": "/d",
        "num_speculative_tokens": 3,
    }
    assert flags["--chat-template"] == "/t.jinja"
    assert flags["--middleware"] == "lmforge.serve.middleware.ServingMiddleware"
    assert "--distributed-executor-backend" not in cmd  # GPU: vLLM's default executor
    env = engine_env(config, {}, Path("/s.json"))
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env


def test_cpu_engine_runs_in_one_process_with_a_bounded_kv_cache() -> None:
    config = resolve_serving_config(
        service(gpusPerReplica=0),
        model="/m",
        draft_model=None,
        adapters_file="/a",
        state_file="/s",
    )
    cmd = engine_command(config, "python", None)
    assert cmd[cmd.index("--distributed-executor-backend") + 1] == "uni"
    assert "--chat-template" not in cmd and "--quantization" not in cmd
    env = engine_env(config, {"OMP_NUM_THREADS": "2"}, Path("/s"))
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["OMP_NUM_THREADS"] == "2"  # an explicit setting wins


def test_engine_flags_do_not_depend_on_the_adapters() -> None:
    """The flags are in the pod template, which must not change when adapters do."""
    a = service(adapters=[])
    b = service(
        adapters=[{"name": "x", "source": "pvc://a/x"}, {"name": "y", "source": "pvc://a/y"}]
    )
    kw: dict[str, Any] = {
        "model": "/m",
        "draft_model": None,
        "adapters_file": "/a",
        "state_file": "/s",
    }
    assert resolve_serving_config(a, **kw).engine == resolve_serving_config(b, **kw).engine


# ---------------------------------------------------------------- adapter plan


def adapter(name: str, path: str) -> DesiredAdapter:
    return DesiredAdapter(name=name, path=path)


def test_plan_loads_missing_unloads_unwanted_and_reloads_moved() -> None:
    desired = [adapter("a", "/a"), adapter("b", "/b2"), adapter("c", "/c"), adapter("d", "/d")]
    loaded = {"a": "/a", "b": "/b1", "old": "/old"}
    plan = plan_sync(desired, loaded, present={"/a", "/b2", "/c"})
    assert [a.name for a in plan.load] == ["b", "c"]
    assert plan.unload == ["b", "old"]
    assert [a.name for a in plan.pending] == ["d"]


def test_plan_does_not_retry_a_rejected_adapter() -> None:
    plan = plan_sync([adapter("a", "/a")], {}, present={"/a"}, failed={"a"})
    assert plan.load == [] and plan.unload == []


# ---------------------------------------------------------------- readiness


@pytest.mark.parametrize(
    ("state", "ready"),
    [
        ({}, False),
        ({"model": "m", "modelLoaded": False, "adapters": {}}, False),
        ({"model": "m", "modelLoaded": True, "adapters": {}}, True),
        ({"model": "m", "modelLoaded": True, "adapters": {"a": {"state": "Loading"}}}, False),
        ({"model": "m", "modelLoaded": True, "adapters": {"a": {"state": "Pending"}}}, True),
        ({"model": "m", "modelLoaded": True, "adapters": {"a": {"state": "Failed"}}}, True),
        ({"model": "m", "modelLoaded": True, "adapters": {"a": {"state": "Loaded"}}}, True),
    ],
)
def test_ready_only_when_model_and_every_loadable_adapter_are_loaded(
    state: dict[str, Any], ready: bool
) -> None:
    assert readiness(state)[0] is ready


# ---------------------------------------------------------------- middleware


def _run_asgi(
    middleware: ServingMiddleware, path: str, body: bytes, method: str = "POST"
) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "method": method}
    asyncio.run(middleware(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def _streaming_app(tokens: list[str]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        request = await receive()
        assert json.loads(request["body"])["model"]  # the body reaches the engine intact
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        events = [{"choices": [{"delta": {"role": "assistant"}}]}]
        events += [{"choices": [{"delta": {"content": t}}]} for t in tokens]
        for event in events:
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {json.dumps(event)}\n\n".encode(),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_middleware_counts_requests_and_streamed_tokens_per_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state.json"
    state.write_text(
        json.dumps({"model": "base", "modelLoaded": True, "adapters": {"ad": {"state": "Loaded"}}})
    )
    monkeypatch.setenv("LMFORGE_SERVE_STATE", str(state))
    middleware = ServingMiddleware(_streaming_app(["one", " two", " three"]))
    before = _sample("lmforge_serving_generated_tokens_total", {"adapter": "ad"})
    requests = _sample("lmforge_serving_requests_total", {"adapter": "ad", "code": "200"})
    status, _ = _run_asgi(middleware, "/v1/chat/completions", json.dumps({"model": "ad"}).encode())
    assert status == 200
    assert _sample("lmforge_serving_generated_tokens_total", {"adapter": "ad"}) == before + 3
    assert (
        _sample("lmforge_serving_requests_total", {"adapter": "ad", "code": "200"}) == requests + 1
    )
    # A model name nobody serves does not become a label of its own.
    unknown = _sample("lmforge_serving_requests_total", {"adapter": "unknown", "code": "200"})
    _run_asgi(middleware, "/v1/completions", json.dumps({"model": "made-up-123"}).encode())
    assert (
        _sample("lmforge_serving_requests_total", {"adapter": "unknown", "code": "200"})
        == unknown + 1
    )


def test_ready_endpoint_answers_from_the_state_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state.json"
    monkeypatch.setenv("LMFORGE_SERVE_STATE", str(state))
    middleware = ServingMiddleware(_streaming_app([]))
    assert _run_asgi(middleware, "/ready", b"", "GET")[0] == 503
    state.write_text(
        json.dumps({"model": "m", "modelLoaded": True, "adapters": {"a": {"state": "Loading"}}})
    )
    status, body = _run_asgi(middleware, "/ready", b"", "GET")
    assert status == 503 and "adapter a" in json.loads(body)["reasons"][0]
    state.write_text(
        json.dumps(
            {
                "model": "m",
                "modelLoaded": True,
                "adapters": {"a": {"state": "Loaded", "path": "/a"}},
            }
        )
    )
    assert _run_asgi(middleware, "/ready", b"", "GET")[0] == 200


# ---------------------------------------------------------------- operator: render


def target(
    svc: InferenceService, uris: dict[str, str], claims: tuple[str, ...] = ()
) -> ServingTarget:
    return ServingTarget(svc, "ns", "uid", uris, claims)


def test_adapters_never_change_the_pod_template() -> None:
    svc = service(adapters=[{"name": "a", "fromJob": {"name": "ft"}}])
    pending = render_children(
        target(svc, {"model": "pvc://models/base", "adapters[0]": ""}, ("ft-output",))
    )
    done = render_children(
        target(
            svc,
            {"model": "pvc://models/base", "adapters[0]": "pvc://ft-output/finetunejob/ft/final"},
            ("ft-output",),
        )
    )
    (before,) = pending.of_kind("Deployment")
    (after,) = done.of_kind("Deployment")
    assert before["spec"]["template"] == after["spec"]["template"]
    adapters_before = json.loads(pending.objects[1]["data"]["adapters.json"])["adapters"]
    adapters_after = json.loads(done.objects[1]["data"]["adapters.json"])["adapters"]
    assert adapters_before == []
    assert adapters_after == [
        {
            "name": "a",
            "path": "/mnt/pvc/ft-output/finetunejob/ft/final",
            "uri": "pvc://ft-output/finetunejob/ft/final",
        }
    ]
    mounts = {
        m["mountPath"] for m in after["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert "/mnt/pvc/ft-output" in mounts


def test_deployment_probes_security_gpus_and_service() -> None:
    children = render_children(
        target(service(gpusPerReplica=2, replicas=3), {"model": "pvc://models/base"})
    )
    (deployment,) = children.of_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 3
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not children.of_kind("HorizontalPodAutoscaler")
    (svc,) = children.of_kind("Service")
    assert svc["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_replicas_may_patch_their_report_config_map_and_nothing_else() -> None:
    children = render_children(target(service(), {"model": "pvc://models/base"}))
    (role,) = children.of_kind("Role")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["chat-adapter-state"],
            "verbs": ["get", "patch"],
        }
    ]


def test_autoscaling_renders_an_hpa_on_load_and_leaves_replicas_to_it() -> None:
    svc = service(
        autoscaling={"minReplicas": 0, "maxReplicas": 5, "metric": "concurrency", "target": 8}
    )
    children = render_children(target(svc, {"model": "pvc://models/base"}))
    (hpa,) = children.of_kind("HorizontalPodAutoscaler")
    (deployment,) = children.of_kind("Deployment")
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["minReplicas"] == 1  # scale to zero needs KEDA
    assert hpa["spec"]["maxReplicas"] == 5
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "lmforge_serving_load"},
                "target": {"type": "AverageValue", "averageValue": "8.0"},
            },
        }
    ]


def test_each_autoscaling_metric_is_its_own_per_replica_metric() -> None:
    """gpu-utilization once scaled on CPU utilization (and every other choice on the same
    running+waiting count): each choice now names its own Pods metric."""
    names = {}
    choices = get_args(AutoscalingSpec.model_fields["metric"].annotation)
    for metric in choices:
        scaling = {"maxReplicas": 3, "metric": metric, "target": 2.5}
        children = render_children(target(service(autoscaling=scaling), {"model": "pvc://m/b"}))
        ((spec,),) = [h["spec"]["metrics"] for h in children.of_kind("HorizontalPodAutoscaler")]
        assert spec["type"] == "Pods"
        assert spec["pods"]["target"] == {"type": "AverageValue", "averageValue": "2.5"}
        names[metric] = spec["pods"]["metric"]["name"]
    assert names == {
        "concurrency": "lmforge_serving_load",
        "queue-length": "lmforge_serving_queue_length",
        "requests-per-second": "lmforge_serving_requests_per_second",
        "gpu-utilization": "lmforge_serving_gpu_utilization",
        "kv-cache-usage": "lmforge_serving_kv_cache_usage",
    }


def test_fixed_replicas_are_handed_over_when_autoscaling_takes_over() -> None:
    """Switching from fixed replicas to autoscaling must not reset the Deployment to 1:
    replicas the operator applied go to a handover manager first (a pure decision on the
    live Deployment's managedFields)."""
    scaled = target(
        service(autoscaling={"maxReplicas": 4, "target": 5}), {"model": "pvc://models/base"}
    )

    def live(replicas: int, manager: str, operation: str = "Apply") -> dict[str, Any]:
        fields = {"f:spec": {"f:replicas": {}, "f:template": {}}}
        return {
            "metadata": {
                "name": "chat",
                "managedFields": [{"manager": manager, "operation": operation, "fieldsV1": fields}],
            },
            "spec": {"replicas": replicas},
        }

    assert replicas_handover(scaled, live(3, "lmforge-operator")) == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat", "namespace": "ns"},
        "spec": {"replicas": 3},
    }
    # Already the HPA's (kube-controller-manager updates the scale), or no Deployment yet.
    assert replicas_handover(scaled, live(3, "kube-controller-manager", "Update")) is None
    assert replicas_handover(scaled, None) is None
    # Zero replicas would keep the HPA from acting: let the field default to 1.
    assert replicas_handover(scaled, live(0, "lmforge-operator")) is None
    fixed = target(service(replicas=3), {"model": "pvc://models/base"})
    assert replicas_handover(fixed, live(3, "lmforge-operator")) is None


def test_example_service_renders() -> None:
    (svc,) = load_file(EXAMPLES / "inferenceservice.yaml")
    assert isinstance(svc, InferenceService)
    uris = {"model": "pvc://models/llama", "adapters[0]": "", "adapters[1]": "pvc://out/dpo/final"}
    assert [a.name for a in desired_adapters(target(svc, uris)).adapters] == ["dpo"]


# ---------------------------------------------------------------- operator: status


def observed(**kw: Any) -> ServingObserved:
    base: dict[str, Any] = {
        "generation": 2,
        "status": {},
        "url": "http://chat.ns.svc.cluster.local:8000/v1",
        "model_uri": "pvc://models/base",
        "model_waiting_for": "",
        "model_job_failed": False,
        "adapters": [],
        "deployment": {"status": {"replicas": 2, "readyReplicas": 2}},
        "desired_replicas": 2,
        "reports": {},
        "live_pods": {"p1", "p2"},
        "now": "2026-01-01T00:00:00Z",
    }
    return ServingObserved(**(base | kw))


def _report(**adapters: str) -> str:
    return json.dumps(
        {
            "modelLoaded": True,
            "adapters": {n: {"state": s, "path": f"/{n}"} for n, s in adapters.items()},
        }
    )


def _condition(status: dict[str, Any], type_: str) -> str:
    return next(c["status"] for c in status["conditions"] if c["type"] == type_)


def test_status_pending_adapter_then_loaded_on_every_replica() -> None:
    waiting = AdapterRef("a", "", "FinetuneJob ft")
    status = decide_status(observed(adapters=[waiting]))
    assert status["phase"] == "Ready"
    assert status["adapters"][0]["state"] == "Pending"
    assert _condition(status, "AdaptersLoaded") == "False"
    ready = AdapterRef("a", "pvc://o/final", "FinetuneJob ft")
    half = decide_status(
        observed(adapters=[ready], reports={"p1": _report(a="Loaded"), "p2": _report(a="Loading")})
    )
    assert half["adapters"][0]["state"] == "Loading" and half["adapters"][0]["loadedReplicas"] == 1
    both = decide_status(
        observed(
            adapters=[ready],
            reports={
                "p1": _report(a="Loaded"),
                "p2": _report(a="Loaded"),
                "gone": _report(a="Failed"),
            },
        )
    )
    assert both["adapters"][0] | {} == {
        "name": "a",
        "uri": "pvc://o/final",
        "state": "Loaded",
        "loadedReplicas": 2,
        "message": "",
    }
    assert _condition(both, "AdaptersLoaded") == "True" and _condition(both, "Ready") == "True"
    assert both["observedGeneration"] == 2 and both["readyReplicas"] == 2


def test_status_model_waiting_for_its_job_and_failed_adapters() -> None:
    status = decide_status(
        observed(model_uri="", model_waiting_for="FinetuneJob base", deployment=None)
    )
    assert status["phase"] == "Pending" and _condition(status, "ModelLoaded") == "False"
    failed = AdapterRef("a", "", "FinetuneJob ft", job_failed=True)
    status = decide_status(observed(adapters=[failed]))
    assert status["phase"] == "Degraded" and status["adapters"][0]["state"] == "Failed"


def test_status_of_an_autoscaled_service_counts_what_the_hpa_wants() -> None:
    """The message counts the replicas the HPA chose (the Deployment's spec.replicas); a
    scale-up still loading its new replicas is Ready, fewer ready than the floor Degraded."""

    def ready_condition(deployment: dict[str, Any]) -> tuple[str, str]:
        status = decide_status(observed(deployment=deployment, desired_replicas=1))
        (ready,) = [c for c in status["conditions"] if c["type"] == "Ready"]
        return status["phase"], ready["message"]

    scaling_up = {"spec": {"replicas": 3}, "status": {"replicas": 3, "readyReplicas": 1}}
    assert ready_condition(scaling_up) == ("Ready", "1 of 3 replicas ready")
    scaled = {"spec": {"replicas": 3}, "status": {"replicas": 3, "readyReplicas": 3}}
    assert ready_condition(scaled) == ("Ready", "3 of 3 replicas ready")
    fixed = decide_status(observed(desired_replicas=3))  # spec.replicas 3, 2 ready
    assert fixed["phase"] == "Degraded"
    assert [c["message"] for c in fixed["conditions"] if c["type"] == "Ready"] == [
        "2 of 3 replicas ready"
    ]


def test_lmforge_serve_does_not_import_torch() -> None:
    """The supervisor runs in the main venv (or beside the engine in the image): no torch."""
    import subprocess
    import sys

    code = (
        "import sys, lmforge.cli, lmforge.serve.run, lmforge.serve.middleware, "
        "lmforge.serve.vllm_plugin, lmforge.serve.supervisor; "
        "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stopping_the_engine_stops_what_it_started(tmp_path: Path) -> None:
    """vLLM's EngineCore may ignore the SIGTERM its API server exits on; stopping the
    engine must not leave it running (it holds GBs and a busy core)."""
    pid_file = tmp_path / "core.pid"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    engine = (
        "import subprocess, sys, time\n"
        f"core = subprocess.Popen([sys.executable, '-c', {stubborn!r}])\n"
        f"open({str(pid_file)!r}, 'w').write(str(core.pid))\n"
        "time.sleep(600)\n"
    )
    config = SimpleNamespace(port=1, name="m", state_file=str(tmp_path / "state.json"))
    supervisor = Supervisor(config, sys.executable, tmp_path)  # type: ignore[arg-type]
    supervisor.engine = subprocess.Popen([sys.executable, "-c", engine], start_new_session=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the fake engine never started its core"
        time.sleep(0.05)
    core = int(pid_file.read_text())
    time.sleep(0.5)  # the core has set its SIGTERM handler

    supervisor.stop_engine(timeout=5)

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"  # a zombie waits for init to reap it: it runs no more

    deadline = time.monotonic() + 10
    while alive(core) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(core):
        os.kill(core, signal.SIGKILL)
        raise AssertionError("the engine's child outlived stop_engine")
