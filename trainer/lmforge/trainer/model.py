"""Loading the base model and turning it into what the tuning method trains."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lmforge.trainer.attention import attention_for
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lmforge.api.common import SIXTEEN_BIT_BASE_TYPES, RopeScaling, TrainingSpec, TuningMethod
from lmforge.api.kinds import AlignmentJobSpec
from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)


class MethodError(ValueError):
    """The tuning method cannot be applied to this model or on this machine."""


@dataclass(frozen=True)
class Precision:
    """Resolved numeric precision of a run."""

    name: str  # bf16 | fp16 | fp32

    @property
    def compute_dtype(self) -> torch.dtype:
        """What the layers compute in: the autocast dtype in mixed precision."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name, torch.float32)

    def weights_dtype(self, method: TuningMethod, frozen: bool = False) -> torch.dtype:
        """What the model's own weights are loaded in. What the optimizer updates stays fp32
        (the trainer autocasts); a frozen model (a reference) or a frozen base under adapters
        is only ever multiplied by, so it is kept in the compute dtype: half the memory, and
        no 16-bit copy autocast would make of every weight each step (the adapters are made
        fp32: `train_in_fp32`)."""
        if frozen or method.type in SIXTEEN_BIT_BASE_TYPES:
            return self.compute_dtype
        return torch.float32

    @property
    def trainer_flags(self) -> dict[str, bool]:
        return {"bf16": self.name == "bf16", "fp16": self.name == "fp16"}

    def autocast(self, device: torch.device) -> Any:
        """Autocast to the compute dtype, as the Trainer wraps its steps: for the forward
        passes a recipe makes itself (where a 16-bit base meets fp32 adapter weights)."""
        return torch.autocast(device.type, dtype=self.compute_dtype, enabled=self.name != "fp32")


def resolve_precision(requested: str) -> Precision:
    """`auto`: bf16 on GPUs that support it, fp32 on CPU (bf16 autocast there is slow)."""
    cuda = torch.cuda.is_available()
    name = requested
    if requested == "auto":
        name = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if name in ("bf16", "fp16") and not cuda:
        log.warning("precision %s needs a GPU; training in fp32 on CPU", name)
        name = "fp32"
    return Precision(name)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def rope_parameters(config: Any, scaling: RopeScaling) -> dict[str, Any]:
    """RoPE parameters that stretch the trained context by `scaling.factor`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update({"rope_type": scaling.type, "factor": scaling.factor})
    if scaling.type == "yarn":
        params["original_max_position_embeddings"] = config.max_position_embeddings
    return params


def load_model(
    path: str,
    *,
    method: TuningMethod,
    training: TrainingSpec,
    precision: Precision,
    strategy: str = "single",
    trust_remote_code: bool = False,
    frozen: bool = False,
) -> PreTrainedModel:
    """Load the base model with quantization and RoPE scaling applied, and on CUDA the
    varlen attention (attention.py) where it covers the model; `frozen`: a model nothing
    trains (a reference), in the compute dtype."""
    kwargs: dict[str, Any] = {
        "dtype": precision.weights_dtype(method, frozen),
        "trust_remote_code": trust_remote_code,
    }
    if method.type == "qlora":
        kwargs["quantization_config"] = _bitsandbytes_config(method)
    if training.rope_scaling is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        config.rope_parameters = rope_parameters(config, training.rope_scaling)
        config.max_position_embeddings = int(
            config.max_position_embeddings * training.rope_scaling.factor
        )
        kwargs["config"] = config
    if method.type == "qlora" and adapter_base(path) is not None:
        raise MethodError(
            f"model {path} is an adapter; qlora cannot merge it into a quantized base. Export the "
            "earlier job merged (method.mergeOnExport) and start from merged/, or use lora"
        )
    model = load_pretrained(AutoModelForCausalLM, path, **kwargs)
    implementation = attention_for(model, precision.compute_dtype)
    if implementation is not None:
        model.set_attn_implementation(implementation)
    if training.gradient_checkpointing:
        model.config.use_cache = False
    if training.liger_kernels:
        use_liger_kernels(model, strategy)
    return model


def load_reference(config: RunConfig, precision: Precision) -> PreTrainedModel:
    """The frozen reference of an AlignmentJob: method.referenceModel, else a second copy of
    the start model (full fine-tuning changes the policy in place), in the compute dtype."""
    spec = config.spec
    assert isinstance(spec, AlignmentJobSpec)
    path = config.paths.model
    if spec.method.reference_model is not None:
        path = config.model_path("method.referenceModel")
    log.info("reference model: %s", path)
    reference = load_model(
        path,
        method=spec.tuning.model_copy(update={"type": "full"}),  # not quantized
        training=spec.training,
        strategy=spec.distributed.strategy,
        precision=precision,
        trust_remote_code=spec.model.trust_remote_code,
        frozen=True,
    )
    reference.requires_grad_(False)
    return reference.eval()


def use_liger_kernels(model: PreTrainedModel, strategy: str = "single") -> None:
    """Put Liger's Triton kernels in place of the model's RMSNorm, RoPE and SwiGLU MLP, and,
    for a causal LM, its LM head and loss: the cross-entropy in chunks of tokens, so that a
    training step never holds the whole [tokens x vocabulary] logits (nor their fp32 copy).
    Outside training, or without labels, the model returns its logits as before. The model
    type must be one Liger covers; its kernels run on CUDA only.

    Under ZeRO-3 the head stays the model's own: the fused loss reads the head's weight
    outside the head's forward, where DeepSpeed has partitioned it to nothing."""
    field = "training.ligerKernels"
    if not torch.cuda.is_available():
        raise MethodError(f"{field}: Liger's kernels are Triton kernels for CUDA GPUs; none here")
    from liger_kernel.transformers.monkey_patch import (
        MODEL_TYPE_TO_APPLY_LIGER_FN,
        _apply_liger_kernel_to_instance,
    )

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        covered = ", ".join(sorted(t for t in MODEL_TYPE_TO_APPLY_LIGER_FN if t))
        raise MethodError(
            f"{field}: Liger has no kernels for model type {model_type!r}; it covers {covered}"
        )
    # The fused head replaces `forward` with a causal LM's; a reward model keeps its own.
    causal_lm = type(model).__name__.endswith("ForCausalLM")
    fused_head = causal_lm and not strategy.startswith("zero3")
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=fused_head)
    head = "fused LM head and loss" if fused_head else "the model's own head"
    log.info("Liger kernels in place (%s, %s)", model_type, head)


def adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter directory (e.g. an SFT job's LoRA output), else None."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise MethodError(f"{config}: adapter without base_model_name_or_path; cannot load it")
    return str(base)


def load_pretrained(auto_class: Any, path: str, **kwargs: Any) -> Any:
    """`auto_class.from_pretrained(path)`, also when `path` is an adapter directory (the final/
    of a LoRA job): the adapter is then merged into its base, so the next job starts from
    plain weights (and can put its own adapter, or a reward head, on top)."""
    if not (Path(path) / "adapter_config.json").is_file() or "quantization_config" in kwargs:
        return auto_class.from_pretrained(path, **kwargs)
    from peft import PeftConfig, PeftModel

    adapter = PeftConfig.from_pretrained(path)
    log.info(
        "model %s is an adapter: merging it into its base %s", path, adapter.base_model_name_or_path
    )
    base = auto_class.from_pretrained(adapter.base_model_name_or_path, **kwargs)
    adapter.task_type = None  # merge only: works under any head (e.g. a reward model's)
    merged = PeftModel.from_pretrained(base, path, config=adapter).merge_and_unload()
    # PEFT froze every base weight for inference; the next job's method decides what trains.
    return merged.requires_grad_(True)


def _bitsandbytes_config(method: TuningMethod) -> Any:
    quant = method.quantization
    assert quant is not None  # the API requires it for qlora
    if not torch.cuda.is_available():
        raise MethodError(
            f"method.type qlora loads the base model in {quant.bits}-bit through bitsandbytes, "
            "which needs a CUDA GPU; this machine has none. Use method.type lora here, or run "
            "the job on a GPU node."
        )
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, quant.compute_dtype)
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


# ---------------------------------------------------------------- target modules


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the linear layers an adapter can target (lm_head excluded)."""
    names = set()
    for full, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ in (
            "Linear4bit",
            "Linear8bitLt",
        )
        if is_linear and not full.endswith("lm_head"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model: nn.Module, targets: list[str]) -> list[str] | str:
    """`all-linear` or names that exist; otherwise fail at once listing what exists."""
    if targets == ["all-linear"]:
        return "all-linear"
    available = linear_module_names(model)
    all_names = {full.rsplit(".", 1)[-1] for full, _ in model.named_modules()}
    missing = [t for t in targets if t not in all_names]
    if missing:
        raise MethodError(
            f"method.lora.targetModules: {', '.join(missing)} not found in the model; "
            f"its linear modules are: {', '.join(available)} (or use all-linear)"
        )
    return targets


# ---------------------------------------------------------------- PEFT


def apply_method(
    model: PreTrainedModel, method: TuningMethod, total_steps: int, task_type: str = "CAUSAL_LM"
) -> nn.Module:
    """Wrap the model for the tuning method; full and lisa train the model itself."""
    config = peft_config(model, method, total_steps, task_type)
    if config is None:
        return model
    import peft

    if method.type == "qlora":
        model = peft.prepare_model_for_kbit_training(model)
    return train_in_fp32(peft.get_peft_model(model, config))


def train_in_fp32(model: nn.Module) -> nn.Module:
    """Make every trainable weight fp32 (the optimizer's updates are too small for 16 bits,
    and fp16's gradient scaler refuses 16-bit gradients). PEFT makes its adapter weights
    fp32 over a 16-bit base itself, but not all it trains: a reward model's new score head,
    say, is a copy of a 16-bit module. The frozen base keeps its dtype."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
    return model


def peft_config(
    model: PreTrainedModel, method: TuningMethod, total_steps: int, task_type: str = "CAUSAL_LM"
) -> Any:
    """The PEFT config of the tuning method (None for full and lisa). `task_type` SEQ_CLS
    (reward models) also trains the new score head; TRL trainers take the config as
    `peft_config` and keep the base model as their reference."""
    if method.type in ("full", "lisa"):
        return None
    import peft

    lora = method.lora
    if method.type in ("lora", "qlora", "dora", "adalora", "ia3"):
        targets = check_target_modules(model, lora.target_modules)
    config: Any
    if method.type in ("lora", "qlora", "dora"):
        config = peft.LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            use_dora=method.type == "dora",
            task_type=task_type,
        )
    elif method.type == "adalora":
        config = peft.AdaLoraConfig(
            init_r=method.adalora.initial_rank,
            target_r=method.adalora.target_rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            total_step=max(total_steps, 2),
            tinit=0,
            tfinal=0,
            task_type=task_type,
        )
    elif method.type == "ia3":
        ia3_targets = None if targets == "all-linear" else targets
        ffn = None
        if ia3_targets is not None:
            ffn = [t for t in ia3_targets if any(k in t for k in ("mlp", "down", "fc", "ffn"))]
        config = peft.IA3Config(
            target_modules=ia3_targets,
            feedforward_modules=ffn,
            task_type=task_type,
        )
    elif method.type == "prefix-tuning":
        config = peft.PrefixTuningConfig(
            num_virtual_tokens=method.virtual_tokens.num_virtual_tokens,
            task_type=task_type,
        )
    elif method.type == "prompt-tuning":
        config = peft.PromptTuningConfig(
            num_virtual_tokens=method.virtual_tokens.num_virtual_tokens,
            task_type=task_type,
        )
    else:  # pragma: no cover - the API enum is exhaustive
        raise MethodError(f"method.type {method.type} is not supported")
    return config


def weight_dtypes(model: nn.Module) -> dict[str, str | None]:
    """The dtypes the trainable and the frozen weights are kept in (None: there are none;
    "mixed" where they differ, as in a quantized base)."""

    def dtype_of(trainable: bool) -> str | None:
        kinds = {
            str(p.dtype).removeprefix("torch.")
            for p in model.parameters()
            if p.requires_grad == trainable
        }
        return (kinds.pop() if len(kinds) == 1 else "mixed") if kinds else None

    return {"trainable_weights_dtype": dtype_of(True), "frozen_weights_dtype": dtype_of(False)}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
