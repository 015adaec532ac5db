"""The pre-flight memory estimate, and what `distributed.strategy: auto` picks from it.

Pure arithmetic on the model's shape (its config.json), the tuning method, the
precision, the optimizer and the batch: no torch, so the CLI, the operator and
the trainer can all ask. The figures are rough on purpose (weights, gradients,
optimizer states and activations, per GPU); they decide between strategies that
differ by multiples, not by a few percent.

Bytes per parameter, as LMForge trains (see lmforge.trainer.model):
- weights: fp32 for full fine-tuning and lisa (mixed precision autocasts fp32 weights);
  adapter methods keep their frozen base in the 16-bit compute dtype under mixed
  precision, their own weights in fp32; 4-bit 0.5, 8-bit 1 (QLoRA; embeddings and the
  head stay 16-bit);
- gradients: fp32, trainable parameters only;
- optimizer: AdamW 8 (two fp32 moments), 8-bit AdamW 2, Adafactor ~0.5
  (factored second moments), SGD 0 (no momentum);
- activations: per layer and token what transformers' Llama layers keep for the
  backward pass (layer_activation_bytes, measured: fused attention, so no s^2 term; LoRA's
  dropout keeps each adapted projection's input again), plus, under 16-bit autocast, the
  16-bit copy of every fp32 weight multiplied by (2 bytes a parameter; not kept with
  gradient checkpointing, which keeps one hidden state per layer and recomputes one layer
  at a time); plus the logits and their fp32 copy for the loss.
- a frozen reference (the DPO family's and KTO's against full fine-tuning or a
  method.referenceModel, PPO's likewise, GRPO/RLOO's KL reference): the same shape in the
  compute dtype, sharded with the policy under FSDP and ZeRO-3 (TRL prepares it so),
  offloaded under zero3-offload. A PEFT policy's reference is itself with its adapter off.
A scoring reward model (method.rewards) is not counted (it is usually small).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.api.common import SIXTEEN_BIT_BASE_TYPES, TuningMethod
from lmforge.api.kinds import AlignmentJobSpec, TrainingJobSpec

GIB = 1024**3
# Of a GPU's memory, the share a run may plan to use (CUDA context, allocator fragmentation).
USABLE_FRACTION = 0.9
OPTIMIZER_BYTES = {
    "adamw": 8.0,
    "adamw-8bit": 2.0,
    "paged-adamw-8bit": 2.0,
    "adafactor": 0.5,
    "sgd": 0.0,
}
# Bytes a decoder layer keeps for backward per token, per unit of hidden size, MLP
# intermediate size and key/value width, by how the layer computes: in fp32; in 16 bits
# under autocast over fp32 weights (the residual stream and the norms stay fp32); over a
# 16-bit base (adapter methods: the residual stream is 16-bit too). Measured on
# transformers' Llama with saved-tensor hooks (tests/unit/test_memory.py measures them
# again). Under autocast each linear layer also keeps the 16-bit copy of its fp32 weight
# that it multiplied by: 2 bytes a parameter, held until the backward pass reaches it.
LAYER_ACTIVATION_BYTES = {"fp32": (32, 16, 8), "autocast": (30, 8, 4), "16-bit": (26, 9, 5)}
# LoRA's dropout (lora.dropout > 0) keeps each adapted projection's input again, dropped, with
# its mask: per unit of hidden and intermediate size (measured as above; all-linear targets).
LORA_DROPOUT_BYTES = {"fp32": (40, 4), "autocast": (24, 4), "16-bit": (24, 4)}
DROPOUT_TYPES = ("lora", "qlora", "dora", "adalora")
# DoRA's magnitude scaling keeps each adapted projection's base and adapter outputs as well:
# bytes per token and output feature (two tensors in the compute dtype; measured as above).
# With dropout over a 16-bit base it also recomputes each base output from the dropped
# input and keeps a 16-bit copy of the weight for that: 2 bytes a parameter of the layer.
DORA_OUTPUT_BYTES = {"fp32": 8, "autocast": 4, "16-bit": 4}
# AdaLoRA over a 16-bit base keeps more than LoRA, dropout or not (its adapter computes in
# fp32): measured on two shapes, 12 x hidden + 3.4 x intermediate bytes a token and layer.
ADALORA_INPUT_BYTES = (13, 4)
Regime = Literal["fp32", "autocast", "16-bit"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Strategy = Literal["ddp", "fsdp", "zero2", "zero3", "zero3-offload"]
# AlignmentJob methods that compare the policy with a frozen reference model.
REFERENCE_METHODS = ("dpo", "ipo", "kto", "ppo", "grpo", "rloo")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer (Llama-style attention and gated MLP)."""

    hidden_size: int
    layers: int
    vocab_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config.json") -> ModelShape:
        """Read a Hugging Face config.json; a missing field is named with the file."""
        text = config.get("text_config")
        if isinstance(text, Mapping):  # multimodal wrappers keep the LM's sizes here
            config = {**config, **text}

        def need(*names: str) -> int:
            for name in names:
                value = config.get(name)
                if isinstance(value, int) and value > 0:
                    return value
            raise ValueError(
                f"{source}: field {names[0]!r} missing (needed for the memory estimate)"
            )

        heads = need("num_attention_heads", "n_head")
        return cls(
            hidden_size=need("hidden_size", "n_embd", "d_model"),
            layers=need("num_hidden_layers", "n_layer"),
            vocab_size=need("vocab_size"),
            intermediate_size=need("intermediate_size", "ffn_dim", "n_inner"),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_parameters(self) -> int:
        linear = sum(a * b for a, b in self.projection_shapes().values())
        return linear + 2 * self.hidden_size  # two RMSNorms

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_parameters + self.embedding_parameters + self.hidden_size


def trainable_parameters(shape: ModelShape, method: TuningMethod) -> int:
    """Parameters the method trains (adapters: rank x (in + out) per adapted projection)."""
    if method.type == "full":
        return shape.parameters
    if method.type == "lisa":
        active = min(method.lisa.active_layers, shape.layers)
        return active * shape.layer_parameters + shape.embedding_parameters
    if method.type in ("prefix-tuning", "prompt-tuning"):
        tokens = method.virtual_tokens.num_virtual_tokens
        per_token = shape.hidden_size * (2 * shape.layers if method.type == "prefix-tuning" else 1)
        return tokens * per_token
    projections = shape.projection_shapes()
    targets = method.lora.target_modules
    chosen = [
        shape_
        for name, shape_ in projections.items()
        if "all-linear" in targets or any(name == t or name.endswith(t) for t in targets)
    ] or list(projections.values())  # names of another architecture: assume all linears
    if method.type == "ia3":
        return shape.layers * sum(out for _, out in chosen)
    rank = method.adalora.initial_rank if method.type == "adalora" else method.lora.rank
    return shape.layers * sum(rank * (a + b) for a, b in chosen)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes for the whole model (unsharded), and per process for activations."""

    parameters: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float  # per process, for one micro-batch
    layer_weights: float  # one decoder layer: what FSDP/ZeRO-3 gather at a time
    reference: float = 0.0  # a frozen reference model beside the policy (AlignmentJobs)

    def per_gpu(self, strategy: Strategy, world_size: int) -> float:
        """Peak bytes on one GPU under `strategy` with `world_size` processes."""
        n = max(world_size, 1)
        states = self.gradients + self.optimizer
        if strategy == "ddp":
            return self.weights + self.reference + states + self.activations
        if strategy == "zero2":
            return self.weights + self.reference + states / n + self.activations
        gathered = 2 * self.layer_weights  # the current layer plus the prefetched next one
        if strategy in ("fsdp", "zero3"):
            return (self.weights + self.reference + states) / n + gathered + self.activations
        # zero3-offload: parameters, gradients and optimizer states live in host memory;
        # the GPU holds the layers being computed and the activations.
        return gathered + self.activations

    def describe(self) -> str:
        reference = f"reference {_gib(self.reference)}, " if self.reference else ""
        return (
            f"{_count(self.parameters)} parameters ({_count(self.trainable)} trainable): "
            f"weights {_gib(self.weights)}, {reference}gradients {_gib(self.gradients)}, "
            f"optimizer {_gib(self.optimizer)}, activations {_gib(self.activations)} per process"
        )


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB / 10 else f"{value / 2**20:.1f} MiB"


def layer_activation_bytes(
    shape: ModelShape, regime: Regime, lora_dropout: bool = False, method: str = "full"
) -> float:
    """Bytes one decoder layer keeps for the backward pass per token when it computes as
    `regime` says (LAYER_ACTIVATION_BYTES), with LoRA's dropout or without, and what DoRA
    and AdaLoRA keep besides (all-linear targets)."""
    hidden, intermediate, kv = LAYER_ACTIVATION_BYTES[regime]
    kv_width = shape.kv_heads * shape.head_dim
    kept = hidden * shape.hidden_size + intermediate * shape.intermediate_size + kv * kv_width
    if lora_dropout:
        hidden, intermediate = LORA_DROPOUT_BYTES[regime]
        kept += hidden * shape.hidden_size + intermediate * shape.intermediate_size
    if method == "dora":
        outputs = sum(out for _, out in shape.projection_shapes().values())
        kept += DORA_OUTPUT_BYTES[regime] * outputs
    if method == "adalora" and regime == "16-bit":
        hidden, intermediate = ADALORA_INPUT_BYTES
        kept += hidden * shape.hidden_size + intermediate * shape.intermediate_size
    return kept


def compute_regime(spec: TrainingJobSpec) -> Regime:
    """How the layers compute: fp32, 16-bit autocast over fp32 (or quantized) weights, or
    over a 16-bit base (adapter methods in mixed precision)."""
    precision = spec.training.precision
    if precision == "auto":
        precision = "bf16" if spec.distributed.gpus_per_node > 0 else "fp32"
    if precision == "fp32":
        return "fp32"
    return "16-bit" if spec.tuning.type in SIXTEEN_BIT_BASE_TYPES else "autocast"


def estimate_memory(shape: ModelShape, spec: TrainingJobSpec) -> MemoryEstimate:
    """The memory a run of `spec` needs for a model of `shape`."""
    method, training = spec.tuning, spec.training
    max_seq_length = spec.dataset.max_seq_length
    total = shape.parameters
    trainable = trainable_parameters(shape, method)
    regime = compute_regime(spec)
    quant = method.quantization if method.type == "qlora" else None
    if quant is not None:
        per_weight = 0.5 if quant.bits == 4 else 1.0
        layer_bytes = shape.layer_parameters * per_weight
        weights = shape.layers * layer_bytes + (shape.embedding_parameters + shape.hidden_size) * 2
    else:
        base_bytes = 2.0 if regime == "16-bit" else 4.0
        layer_bytes = shape.layer_parameters * base_bytes
        weights = total * base_bytes
    added = trainable * 4 if method.type not in ("full", "lisa") else 0  # the adapter, fp32
    tokens = training.batch_size.per_device * max_seq_length
    dora = method.type == "dora"
    dropout = method.type in DROPOUT_TYPES and method.lora.dropout > 0
    # Weight copies kept until the backward pass, bytes a base weight: autocast's 16-bit copy
    # of every fp32 weight (quantized weights are dequantized per use; a 16-bit base needs
    # none, only the adapter's fp32 weights are copied), and DoRA's (DORA_OUTPUT_BYTES).
    copied = 2 if regime == "autocast" and quant is None else 0
    dora_copied = 2 if dora and dropout and regime == "16-bit" else 0
    adapter_copies = trainable * 2 if regime != "fp32" and added else 0
    per_layer = (
        tokens * layer_activation_bytes(shape, regime, dropout, method.type)
        + shape.layer_parameters * (copied + dora_copied)
        + adapter_copies / shape.layers
    )
    if training.gradient_checkpointing:  # each layer's input, then one layer recomputed
        residual = 2 if regime == "16-bit" else 4
        layers = shape.layers * tokens * shape.hidden_size * residual + per_layer
    else:
        layers = shape.layers * per_layer
    compute = 4 if regime == "fp32" else 2
    head = shape.vocab_size * shape.hidden_size * copied
    ends = tokens * shape.hidden_size * 8  # the embeddings' output and the final norm's
    logits = tokens * shape.vocab_size * (compute + 4)  # and their fp32 copy for the loss
    outside_layers = logits + head + ends
    return MemoryEstimate(
        parameters=total,
        trainable=trainable,
        weights=weights + added,
        gradients=trainable * 4.0,
        optimizer=trainable * OPTIMIZER_BYTES[training.optimizer],
        activations=float(layers + outside_layers),
        layer_weights=layer_bytes,
        reference=float(total * compute) if holds_reference(spec) else 0.0,
    )


def holds_reference(spec: TrainingJobSpec) -> bool:
    """Whether the run keeps a second, frozen model beside the policy to measure how far the
    policy moved: the methods with a KL or log-ratio term, unless the policy is an adapter
    over the start model (switched off, it is the reference) and no other model is named."""
    if not isinstance(spec, AlignmentJobSpec) or spec.method.type not in REFERENCE_METHODS:
        return False
    if spec.method.type in ("grpo", "rloo") and spec.method.beta == 0:
        return False  # no KL term, no reference
    return spec.method.reference_model is not None or spec.tuning.type in ("full", "lisa")


@dataclass(frozen=True)
class StrategyChoice:
    """What `auto` picked, why, and the estimate it was picked from (None: size unknown)."""

    strategy: Strategy
    reason: str
    estimate: MemoryEstimate | None = None
    per_gpu: float | None = None
    fits: bool = True

    def describe(self) -> str:
        text = f"distributed.strategy auto -> {self.strategy}: {self.reason}"
        return text + (f" [{self.estimate.describe()}]" if self.estimate else "")


def choose_strategy(
    estimate: MemoryEstimate,
    *,
    processes: int,
    gpu_memory: int | None,
    quantized: bool = False,
) -> StrategyChoice:
    """The simplest strategy whose per-GPU estimate fits; `gpu_memory` None means CPU.

    Order of preference: DDP (no sharding traffic), FSDP (shards weights, gradients
    and optimizer states over the processes), ZeRO-3 (the same sharding through
    DeepSpeed, which also handles bitsandbytes-quantized weights), ZeRO-3 with CPU
    offload (parameters and optimizer states in host memory; slowest).
    """

    def choice(strategy: Strategy, reason: str, fits: bool = True) -> StrategyChoice:
        need = estimate.per_gpu(strategy, processes)
        return StrategyChoice(strategy, reason, estimate, need, fits)

    ddp = estimate.per_gpu("ddp", processes)
    if gpu_memory is None:
        return choice("ddp", f"no GPUs: DDP over gloo, ~{_gib(ddp)} per process in host memory")
    budget = gpu_memory * USABLE_FRACTION
    have = f"{_gib(budget)} usable of {_gib(gpu_memory)} per GPU"
    if ddp <= budget:
        return choice("ddp", f"a full replica fits: ~{_gib(ddp)} per GPU, {have}")
    why_not = f"a full replica needs ~{_gib(ddp)}, {have}"
    if processes > 1:
        sharded = estimate.per_gpu("fsdp", processes)
        if sharded <= budget:
            name: Strategy = "zero3" if quantized else "fsdp"
            how = "ZeRO-3 (quantized weights)" if quantized else "FSDP"
            return choice(
                name, f"{why_not}; {how} over {processes} processes needs ~{_gib(sharded)}"
            )
        why_not += f"; sharded over {processes} processes still ~{_gib(sharded)}"
    offload = estimate.per_gpu("zero3-offload", processes)
    if offload <= budget:
        return choice(
            "zero3-offload", f"{why_not}; offloading to CPU leaves ~{_gib(offload)} per GPU"
        )
    return choice(
        "zero3-offload",
        f"{why_not}; even with CPU offload ~{_gib(offload)} per GPU: does not fit, lower "
        "training.batchSize.perDevice or dataset.maxSeqLength, or enable "
        "training.gradientCheckpointing",
        fits=False,
    )


def plan_strategy(
    model_config: Mapping[str, Any] | None,
    spec: TrainingJobSpec,
    gpu_memory: int | None,
    source: str = "config.json",
) -> StrategyChoice:
    """What `strategy: auto` becomes for `spec`.

    `model_config` is the model's config.json (None: not readable here, e.g. an hf:// id
    not downloaded yet); `gpu_memory` the bytes of one GPU (None: no GPU visible).
    """
    distributed = spec.distributed
    on_gpus = distributed.gpus_per_node > 0 and gpu_memory is not None
    if model_config is None:
        # Without the model's size: shard full fine-tuning over several GPUs, else DDP.
        sharded = on_gpus and distributed.processes > 1 and spec.tuning.type == "full"
        return StrategyChoice(
            "fsdp" if sharded else "ddp",
            f"model size unknown ({source} not readable): "
            + ("FSDP for full fine-tuning on several GPUs" if sharded else "DDP"),
        )
    estimate = estimate_memory(ModelShape.from_config(model_config, source), spec)
    return choose_strategy(
        estimate,
        processes=distributed.processes,
        gpu_memory=gpu_memory if on_gpus else None,
        quantized=spec.tuning.type == "qlora",
    )
