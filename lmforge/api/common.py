"""Models shared by all LMForge kinds: model references, data, resources, scheduling, status."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from lmforge.api.base import QUANTITY_PATTERN, ApiModel, Rule, field_, object_field

# ---------------------------------------------------------------- references

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MODEL_URI = (
    r"^(hf://[^@\s]+(@[^\s]+)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|s3://[^\s/]+(/.*)?"
    r"|file://[^\s]+)$"
)
DATA_URI = r"^(hf://|pvc://|s3://|file://)?[^\s]+$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not _QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a quantity like 500m, 16Gi or 4")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    Field(
        json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN},
    ),
]

TrainingJobKind = Literal["FinetuneJob", "AlignmentJob"]


class JobReference(ApiModel):
    """A training job in the same namespace whose output is used as input."""

    kind: TrainingJobKind = field_("Kind of the referenced job.", "FinetuneJob")
    name: str = field_(
        "Name of the referenced job in the same namespace.",
        min_length=1,
        max_length=253,
        pattern=DNS_LABEL,
    )


class SecretKeyReference(ApiModel):
    """A key of a Secret in the job's namespace."""

    name: str = field_("Name of the Secret.", min_length=1, max_length=253)
    key: str = field_("Key within the Secret.", "token", min_length=1, max_length=253)


def _one_of_source_or_from_job(m: Any) -> bool:
    return (m.source is None) != (m.from_job is None)


SOURCE_XOR_FROM_JOB = Rule(
    cel="has(self.source) != has(self.fromJob)",
    message="set exactly one of source and fromJob",
    field="source",
    check=_one_of_source_or_from_job,
)


class ModelSource(ApiModel):
    """Where model weights come from: a URI or the output of an earlier job."""

    rules = (SOURCE_XOR_FROM_JOB,)

    source: str | None = field_(
        "Model location: hf://org/name[@revision], pvc://claim/path, s3://bucket/prefix, or "
        "file://path (local runs only; relative to the YAML file).",
        None,
        pattern=MODEL_URI,
        max_length=2048,
    )
    from_job: JobReference | None = field_(
        "Use the final output of this FinetuneJob or AlignmentJob; the job waits until "
        "the referenced job has succeeded.",
        None,
    )


ChatTemplateName = Literal[
    "auto", "none", "chatml", "llama3", "qwen2", "alpaca", "vicuna", "zephyr", "mistral", "gemma"
]


class ModelSpec(ModelSource):
    """The base model of a job or service."""

    trust_remote_code: bool = field_(
        "Allow executing model code shipped with the checkpoint (transformers trust_remote_code).",
        False,
    )
    chat_template: ChatTemplateName = field_(
        "Chat template used to render conversations: auto (the tokenizer's own, chatml when it "
        "has none), none (plain concatenation) or a named template.",
        "auto",
    )
    secret_ref: SecretKeyReference | None = field_(
        "Secret holding the Hugging Face (or S3) token used to download the model and data.",
        None,
    )


# ---------------------------------------------------------------- data

DataFormat = Literal[
    "auto",
    "text",
    "text_only",
    "text2text",
    "conversation",
    "paired_conversation",
    "alpaca",
    "sharegpt",
    "openai",
    "preference",
    "kto",
    "prompt",
]
TextSplit = Literal["paragraph", "line", "file"]


class DataSource(ApiModel):
    """One dataset file, directory or hub dataset."""

    uri: str = field_(
        "Data location: hf://org/name, pvc://claim/path, s3://bucket/key, or a local path "
        "(relative to the YAML file) for `lmforge run`. Files: .jsonl, .json, .txt, .parquet, "
        ".csv, .arrow; a directory takes all of those under it.",
        min_length=1,
        max_length=2048,
        pattern=DATA_URI,
    )
    format: DataFormat = field_(
        "Record format. auto detects it; LMFlow text_only/text2text/conversation/"
        "paired_conversation, alpaca, sharegpt (BELLE), openai (messages), text (plain lines), "
        "preference (prompt/chosen/rejected), kto (prompt/completion/label), "
        "prompt (prompts only).",
        "auto",
    )
    weight: float = field_(
        "Relative sampling weight when several sources are mixed.", 1.0, gt=0, le=1000
    )
    split: str = field_(
        "Split to read from hub datasets (and local .parquet/.csv/.arrow folders read as hf://).",
        "train",
        min_length=1,
        max_length=64,
    )
    subset: str | None = field_(
        "Subset (configuration name) of a hub dataset that has several, e.g. 'en' of a "
        "multilingual corpus.",
        None,
        min_length=1,
        max_length=128,
    )
    text_split: TextSplit = field_(
        "How a plain-text (.txt) file is split into documents: paragraph (documents are "
        "separated by blank lines), line (one document per line, as in C4-style dumps) or file "
        "(the whole file is one document).",
        "paragraph",
    )


class EvalSplit(ApiModel):
    """Held-out data for evaluation."""

    fraction: float = field_(
        "Fraction of the training records held out for evaluation (ignored when sources are set).",
        0.0,
        ge=0,
        le=0.5,
    )
    sources: list[DataSource] = field_(
        "Dedicated evaluation data.", default_factory=list, max_length=64
    )


class DatasetSpec(ApiModel):
    """Training data and how it is turned into token sequences."""

    sources: list[DataSource] = field_(
        "Data sources, mixed by weight.", min_length=1, max_length=64
    )
    eval_split: EvalSplit = object_field(EvalSplit, "Held-out evaluation data.")
    max_seq_length: int = field_(
        "Maximum tokens per training sequence. Chat and instruction records longer than this "
        "are truncated (and dropped when no answer token is left); for continued pretraining "
        "the documents are joined with EOS and cut into blocks of this length, so nothing is "
        "truncated.",
        2048,
        ge=16,
        le=1048576,
    )
    packing: bool = field_(
        "Pack several short records into one sequence (attention never crosses records).", False
    )
    train_on_prompt: bool = field_(
        "Also compute the loss on prompt/user tokens, not only on assistant tokens.", False
    )
    keep_partial_block: bool = field_(
        "Continued pretraining: keep the last block of the token stream when it is shorter than "
        "maxSeqLength (false drops it, as most pretraining codebases do). data-stats.json "
        "reports which happened.",
        True,
    )


# ---------------------------------------------------------------- tuning method

TuningMethodType = Literal[
    "full", "lora", "qlora", "dora", "ia3", "prefix-tuning", "prompt-tuning", "adalora", "lisa"
]


class LoraSpec(ApiModel):
    """Low-rank adapter shape (LoRA, QLoRA, DoRA, AdaLoRA)."""

    rank: int = field_("Adapter rank r.", 16, ge=1, le=1024)
    alpha: float = field_("Scaling numerator; the update is scaled by alpha/rank.", 32, gt=0)
    dropout: float = field_("Dropout on the adapter input.", 0.05, ge=0, lt=1)
    target_modules: list[str] = field_(
        "Modules to adapt: all-linear, or module names such as q_proj, v_proj.",
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=128,
    )


class QuantizationSpec(ApiModel):
    """bitsandbytes quantization of the frozen base weights (QLoRA)."""

    bits: Literal[4, 8] = field_("Bits per base weight: 4 or 8.")
    type: Literal["nf4", "fp4"] = field_("4-bit data type.", "nf4")
    double_quant: bool = field_("Quantize the quantization constants too.", True)
    compute_dtype: Literal["bfloat16", "float16", "float32"] = field_(
        "Dtype of the matmuls on dequantized weights.", "bfloat16"
    )


class VirtualTokensSpec(ApiModel):
    """Prefix/prompt tuning: learned virtual tokens."""

    num_virtual_tokens: int = field_("Number of virtual tokens.", 20, ge=1, le=1024)


class AdaLoraSpec(ApiModel):
    """AdaLoRA rank budget."""

    initial_rank: int = field_("Rank every adapter starts with.", 12, ge=1, le=1024)
    target_rank: int = field_("Average rank after budget allocation.", 8, ge=1, le=1024)


class LisaSpec(ApiModel):
    """Layerwise importance sampled training (LMFlow's LISA)."""

    active_layers: int = field_(
        "Transformer layers trained at a time (embeddings and head always train).", 2, ge=1
    )
    interval_steps: int = field_("Steps between re-sampling the active layers.", 20, ge=1)


ADAPTER_TYPES = ("lora", "qlora", "dora", "ia3", "adalora")
# Methods that train small added weights over a frozen, unquantized base: under mixed
# precision the base is kept in the 16-bit compute dtype and only the added weights in fp32
# (full and lisa update the base's own weights; qlora's base is quantized).
SIXTEEN_BIT_BASE_TYPES = ("lora", "dora", "ia3", "adalora", "prefix-tuning", "prompt-tuning")
_MERGEABLE = "['lora','qlora','dora','ia3','adalora']"


class TuningMethod(ApiModel):
    """Which parameters are trained: all of them, an adapter, or sampled layers."""

    rules = (
        Rule(
            cel="self.type == 'qlora' ? has(self.quantization) : true",
            message="qlora needs quantization with bits 4 or 8",
            field="quantization",
            check=lambda m: m.type != "qlora" or m.quantization is not None,
        ),
        Rule(
            cel="has(self.quantization) ? self.type == 'qlora' : true",
            message="quantization is only used with type qlora",
            field="quantization",
            check=lambda m: m.quantization is None or m.type == "qlora",
        ),
        Rule(
            cel=f"self.mergeOnExport ? self.type in {_MERGEABLE} : true",
            message="mergeOnExport needs an adapter method (lora, qlora, dora, ia3, adalora)",
            field="mergeOnExport",
            check=lambda m: not m.merge_on_export or m.type in ADAPTER_TYPES,
        ),
        Rule(
            cel="self.adalora.targetRank <= self.adalora.initialRank",
            message="adalora.targetRank must not exceed adalora.initialRank",
            field="adalora.targetRank",
            check=lambda m: m.adalora.target_rank <= m.adalora.initial_rank,
        ),
    )

    type: TuningMethodType = field_(
        "full, an adapter (lora, qlora, dora, ia3, adalora), prefix-tuning, prompt-tuning, "
        "or lisa.",
        "lora",
    )
    lora: LoraSpec = object_field(LoraSpec, "Adapter shape for lora, qlora, dora and adalora.")
    quantization: QuantizationSpec | None = field_(
        "Base-weight quantization; required for qlora.", None
    )
    virtual_tokens: VirtualTokensSpec = object_field(
        VirtualTokensSpec, "Virtual tokens for prefix-tuning and prompt-tuning."
    )
    adalora: AdaLoraSpec = object_field(AdaLoraSpec, "Rank budget for adalora.")
    lisa: LisaSpec = object_field(LisaSpec, "Layer sampling for lisa.")
    merge_on_export: bool = field_("Also export the adapter merged into the base weights.", False)


# ---------------------------------------------------------------- training loop


class BatchSize(ApiModel):
    """Batch sizes; gradient accumulation = global / (perDevice x processes)."""

    per_device: int = field_("Sequences per process per forward pass.", 1, ge=1, le=4096)
    global_: int | None = field_(
        "Sequences per optimizer step over all processes; must be a multiple of perDevice "
        "times the number of processes.",
        None,
        ge=1,
        le=1048576,
        alias="global",
    )


class RopeScaling(ApiModel):
    """RoPE scaling to fine-tune beyond the model's trained context length."""

    type: Literal["linear", "dynamic", "yarn"] = field_(
        "linear (position interpolation), dynamic (NTK-aware) or yarn."
    )
    factor: float = field_("Context extension factor.", gt=1, le=64)


class TrainingSpec(ApiModel):
    """The optimisation loop."""

    rules = (
        Rule(
            cel="!(has(self.epochs) && has(self.maxSteps))",
            message="set epochs or maxSteps, not both",
            field="maxSteps",
            check=lambda m: m.epochs is None or m.max_steps is None,
        ),
    )

    epochs: float | None = field_(
        "Passes over the data (default 1 when maxSteps is not set).", None, gt=0, le=1000
    )
    max_steps: int | None = field_("Optimizer steps to run.", None, ge=1)
    learning_rate: float | None = field_(
        "Peak learning rate (default 2e-5 for full fine-tuning, 2e-4 for adapters).",
        None,
        gt=0,
        le=1,
    )
    scheduler: Literal["linear", "cosine", "constant", "constant-with-warmup", "polynomial"] = (
        field_("Learning-rate schedule after warmup.", "cosine")
    )
    warmup_ratio: float = field_("Fraction of steps spent warming up.", 0.03, ge=0, le=1)
    weight_decay: float = field_("AdamW weight decay.", 0.0, ge=0, le=1)
    max_grad_norm: float = field_("Gradient clipping norm (0 disables).", 1.0, ge=0)
    batch_size: BatchSize = object_field(BatchSize, "Batch sizes.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field_(
        "Compute precision; auto uses bf16 where the GPU supports it, fp32 on CPU. In bf16 and "
        "fp16, trained weights stay fp32 (autocast) and an adapter's frozen base is kept in "
        "the 16-bit dtype.",
        "auto",
    )
    gradient_checkpointing: bool = field_(
        "Recompute activations in backward to save memory.", False
    )
    liger_kernels: bool = field_(
        "Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, and the LM head with the "
        "cross-entropy in chunks, so the logits are never held whole) in place of the "
        "model's own; CUDA GPUs only, for the model types Liger covers (Llama, Mistral, Qwen, "
        "Gemma, Phi3 and others).",
        False,
    )
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw-8bit", "adafactor", "sgd"] = field_(
        "Optimizer.", "adamw"
    )
    seed: int = field_("Random seed for weights, data order and dropout.", 42, ge=0)
    rope_scaling: RopeScaling | None = field_("Long-context RoPE scaling.", None)
    eval_every_steps: int | None = field_(
        "Evaluate every N steps (default: at the end of each epoch).", None, ge=1
    )
    logging_every_steps: int = field_("Report progress every N steps.", 10, ge=1)


class EvaluationSpec(ApiModel):
    """Task metric computed on the evaluation split by generating answers."""

    metric: Literal["none", "exact-match", "perplexity"] = field_(
        "exact-match compares generated answers with the references after trimming.", "none"
    )
    max_new_tokens: int = field_("Generation budget per answer.", 64, ge=1, le=32768)
    max_samples: int = field_("Evaluate at most this many records.", 200, ge=1)


class DistributedSpec(ApiModel):
    """How many pods and processes train together."""

    rules = (
        Rule(
            # DeepSpeed's CPU accelerator trains one process; accelerate gives several
            # CPU ranks of a DeepSpeed run no process group.
            cel="self.strategy.startsWith('zero') && self.gpusPerNode == 0 ? self.nodes == 1 && "
            "(!has(self.processesPerNode) || self.processesPerNode == 1) : true",
            message="DeepSpeed ZeRO without GPUs runs one process only; multi-process ZeRO "
            "needs gpusPerNode of at least 1",
            field="gpusPerNode",
            check=lambda m: (
                not m.strategy.startswith("zero")
                or m.gpus_per_node > 0
                or (m.nodes == 1 and (m.processes_per_node or 1) == 1)
            ),
        ),
        Rule(
            cel="has(self.processesPerNode) && self.gpusPerNode > 0 ? "
            "self.processesPerNode == self.gpusPerNode : true",
            message="processesPerNode must equal gpusPerNode on GPU nodes (one process per GPU)",
            field="processesPerNode",
            check=lambda m: (
                m.processes_per_node is None
                or m.gpus_per_node == 0
                or m.processes_per_node == m.gpus_per_node
            ),
        ),
    )

    nodes: int = field_("Pods (nodes) that train together.", 1, ge=1, le=512)
    gpus_per_node: int = field_("GPUs per pod (0 trains on CPU).", 1, ge=0, le=16)
    processes_per_node: int | None = field_(
        "Training processes per pod (default: gpusPerNode, or 1 without GPUs).", None, ge=1, le=64
    )
    strategy: Literal["auto", "ddp", "fsdp", "zero2", "zero3", "zero3-offload"] = field_(
        "Data/model parallel strategy; auto estimates the memory per GPU from the model's "
        "config.json, method, precision, optimizer and batch, and picks the simplest that fits: "
        "ddp, fsdp, zero3 or zero3-offload.",
        "auto",
    )

    @property
    def processes(self) -> int:
        """Total training processes over all nodes."""
        per_node = self.processes_per_node or max(self.gpus_per_node, 1)
        return self.nodes * per_node


# ---------------------------------------------------------------- pods


class ResourcesSpec(ApiModel):
    """Per-pod compute resources besides GPUs (which come from gpusPerNode/gpusPerReplica)."""

    requests: dict[str, Quantity] = field_(
        "Resource requests, e.g. cpu: 8, memory: 64Gi.", default_factory=dict
    )
    limits: dict[str, Quantity] = field_("Resource limits.", default_factory=dict)
    shared_memory: Quantity = field_(
        "Size of the memory-backed /dev/shm (NCCL and data loaders need more than 64Mi).",
        "8Gi",
    )


class Toleration(ApiModel):
    """A core/v1 toleration."""

    key: str | None = field_("Taint key; empty with operator Exists matches all taints.", None)
    operator: Literal["Exists", "Equal"] = field_("Exists or Equal.", "Equal")
    value: str | None = field_("Taint value for operator Equal.", None)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = field_(
        "Taint effect to match; empty matches all.", None
    )
    toleration_seconds: int | None = field_("How long a NoExecute taint is tolerated.", None, ge=0)


class SchedulingSpec(ApiModel):
    """Where pods may run and in which queue they wait."""

    node_selector: dict[str, str] = field_("Node labels the pods require.", default_factory=dict)
    tolerations: list[Toleration] = field_(
        "Taints the pods tolerate (the nvidia.com/gpu taint is tolerated automatically).",
        default_factory=list,
    )
    affinity: dict[str, Any] | None = field_(
        "A core/v1 Affinity, copied into the pods as is.",
        None,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = field_("PriorityClass of the pods.", None, max_length=253)
    queue_name: str | None = field_(
        "Kueue LocalQueue; the workload is created suspended and Kueue admits it.",
        None,
        max_length=253,
        pattern=DNS_LABEL,
    )


class RunPolicy(ApiModel):
    """Retries, deadlines, cleanup and suspension."""

    backoff_limit: int = field_(
        "Restarts after retryable failures (OOM, eviction, node loss, NCCL timeout) before the "
        "job fails.",
        3,
        ge=0,
        le=100,
    )
    active_deadline_seconds: int | None = field_(
        "Fail the job when it runs longer than this.", None, ge=1
    )
    ttl_seconds_after_finished: int | None = field_(
        "Delete the finished job's pods this long after completion (outputs stay on the PVC).",
        None,
        ge=0,
    )
    suspend: bool = field_(
        "Stop the pods and keep the checkpoints; set back to false to resume.", False
    )


class CheckpointSpec(ApiModel):
    """Periodic checkpoints and automatic resume."""

    every_steps: int | None = field_("Checkpoint every N optimizer steps.", None, ge=1)
    every_minutes: float | None = field_("Checkpoint every N minutes.", None, gt=0)
    keep: int = field_("Complete checkpoints kept (oldest removed first).", 2, ge=1, le=100)
    resume: Literal["auto", "never"] = field_(
        "auto resumes from the latest complete checkpoint after a restart.", "auto"
    )


class VolumeClaimTemplate(ApiModel):
    """A PersistentVolumeClaim the operator creates for the job."""

    size: Quantity = field_("Requested storage.", "50Gi")
    storage_class_name: str | None = field_("StorageClass (default: the cluster's).", None)
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]] = field_(
        "Access modes; multi-node jobs need ReadWriteMany.",
        default_factory=lambda: ["ReadWriteOnce"],
        min_length=1,
    )


class OutputSpec(ApiModel):
    """Where checkpoints and the final model are written."""

    rules = (
        Rule(
            cel="!(has(self.existingClaim) && has(self.create))",
            message="set existingClaim or create, not both",
            field="create",
            check=lambda m: m.existing_claim is None or m.create is None,
        ),
    )

    existing_claim: str | None = field_(
        "Write into this existing PersistentVolumeClaim.", None, max_length=253, pattern=DNS_LABEL
    )
    create: VolumeClaimTemplate | None = field_(
        "Create a PersistentVolumeClaim owned by the job (the default, 50Gi).", None
    )
    path: str = field_("Folder inside the volume; defaults to <kind>/<name>.", "", max_length=1024)


# ---------------------------------------------------------------- status


class Condition(ApiModel):
    """A metav1.Condition."""

    type: str = field_("Condition type, e.g. Ready, Succeeded, Failed.", max_length=316)
    status: Literal["True", "False", "Unknown"] = field_("True, False or Unknown.")
    reason: str = field_("CamelCase reason.", "", max_length=1024)
    message: str = field_("Human readable detail.", "", max_length=32768)
    last_transition_time: str | None = field_(
        "When status last changed.", None, json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = field_(
        "metadata.generation the condition was computed for.", None, ge=0
    )


ConditionList = Annotated[
    list[Condition],
    Field(
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    ),
]
