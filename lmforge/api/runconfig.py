"""The run config: the contract between whoever launches training and the trainer.

The operator mounts it into every training pod (`/etc/lmforge/run.json`) and
`lmforge run` writes it next to the local outputs; both produce it with
`resolve_run_config`, so a job behaves the same locally and on a cluster.
It is fully resolved: every default is filled in, every location is a path
the trainer can open (or an hf:// id), and nothing is left to guess, with one
exception: `distributed.strategy: auto` stays `auto`, because only the trainer
sees the model's config.json and the GPU's memory; it decides at start
(`lmforge.api.memory.plan_strategy`) and logs the estimate and its reason.

Version history:
- lmforge.io/run-config/v1: FinetuneJob.
- lmforge.io/run-config/v2: FinetuneJob and AlignmentJob; `paths.models` locates every model
  reference of the spec (reference and reward models), not only the base model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError, model_validator

from lmforge.api.base import ApiModel, field_
from lmforge.api.common import ADAPTER_TYPES, TuningMethod
from lmforge.api.kinds import (
    DEFAULT_BETA,
    KINDS,
    TRAINING_KINDS,
    AlignmentJobSpec,
    FinetuneJobSpec,
    RewardFunction,
    TrainingJob,
    TrainingJobSpec,
)

RUN_CONFIG_VERSION = "lmforge.io/run-config/v2"

# Learning rates used when the spec leaves them open: adapters tolerate (and need) larger ones.
DEFAULT_LEARNING_RATE = {"full": 2e-5, "lisa": 5e-5, "adapter": 2e-4, "virtual-tokens": 3e-2}


class RunPaths(ApiModel):
    """Where the trainer reads and writes."""

    model: str = field_("Local directory of the base model, or an hf:// id to download.")
    models: dict[str, str] = field_(
        "Location of every model reference of the spec by field (model, "
        "method.referenceModel, method.rewards[0].model, ...).",
        default_factory=dict,
    )
    output: str = field_("Folder for checkpoints/, final/, metrics.json, logs.")
    data: str = field_("Folder relative data paths are resolved against.", "")


class RunConfig(ApiModel):
    """A fully resolved training run."""

    version: Literal["lmforge.io/run-config/v2"] = field_(
        "Schema version of this file.", RUN_CONFIG_VERSION
    )
    kind: Literal["FinetuneJob", "AlignmentJob"] = field_("Kind of the job this run belongs to.")
    name: str = field_("Job name.")
    namespace: str = field_("Job namespace ('' for local runs).", "")
    spec: FinetuneJobSpec | AlignmentJobSpec = field_("The job spec with every default filled in.")
    paths: RunPaths = field_("Resolved locations.")
    metrics_port: int | None = field_(
        "Port of the Prometheus endpoint served by rank 0 (none: no endpoint).", None
    )

    @model_validator(mode="before")
    @classmethod
    def _spec_of_kind(cls, data: Any) -> Any:
        """Validate `spec` as the spec of `kind` (one clear error, not one per union branch)."""
        if isinstance(data, dict) and data.get("kind") in TRAINING_KINDS:
            spec_type = KINDS[data["kind"]].model_fields["spec"].annotation
            assert spec_type is not None
            if isinstance(data.get("spec"), dict):
                data = dict(data) | {"spec": spec_type.model_validate(data["spec"])}
        return data

    def model_path(self, field: str) -> str:
        """Where the trainer finds the model the spec references at `field`."""
        try:
            return self.paths.models[field]
        except KeyError:
            raise ValueError(f"run config has no location for spec.{field}") from None

    @property
    def processes(self) -> int:
        return self.spec.distributed.processes

    @property
    def gradient_accumulation_steps(self) -> int:
        batch = self.spec.training.batch_size
        assert batch.global_ is not None  # resolved
        return batch.global_ // (batch.per_device * self.processes)

    @property
    def output_dir(self) -> Path:
        return Path(self.paths.output)

    def dump(self, path: Path) -> None:
        """Write atomically (a reader never sees half a config)."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_wire(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        """Read a run config; a clear error names the file and the fields that are wrong."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read run config: {err}") from None
        if data.get("version") != RUN_CONFIG_VERSION:
            raise ValueError(
                f"{path}: run config version {data.get('version')!r} is not supported "
                f"(this trainer reads {RUN_CONFIG_VERSION})"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(f"{path}: invalid run config:\n{err}") from None


def reward_functions(spec: TrainingJobSpec) -> list[RewardFunction]:
    """The user reward functions of a spec (their folders are inputs like data files)."""
    if not isinstance(spec, AlignmentJobSpec):
        return []
    return [r.function for r in spec.method.rewards if r.function is not None]


def input_locations(spec: TrainingJobSpec) -> list[str]:
    """Every non-model input a run reads: dataset files and reward-function folders."""
    data = [s.uri for s in (*spec.dataset.sources, *spec.dataset.eval_split.sources)]
    return data + [f.path for f in reward_functions(spec) if f.path is not None]


def default_learning_rate(method: TuningMethod) -> float:
    if method.type == "full":
        return DEFAULT_LEARNING_RATE["full"]
    if method.type == "lisa":
        return DEFAULT_LEARNING_RATE["lisa"]
    if method.type in ADAPTER_TYPES:
        return DEFAULT_LEARNING_RATE["adapter"]
    return DEFAULT_LEARNING_RATE["virtual-tokens"]


def resolve_run_config(
    job: TrainingJob,
    *,
    models: dict[str, str],
    output: str,
    data: str = "",
    resolve_data_uri: Callable[[str], str] = lambda uri: uri,
    metrics_port: int | None = None,
) -> RunConfig:
    """Fill every default of `job` and resolve its locations into a RunConfig.

    `models` maps every model reference of the spec (`references.model_references`:
    "model", "method.referenceModel", ...) to its resolved location; `resolve_data_uri`
    maps each dataset URI to what the trainer opens (a mounted path, or unchanged).
    """
    spec = job.spec.model_copy(deep=True)
    training, distributed = spec.training, spec.distributed
    if training.epochs is None and training.max_steps is None:
        training.epochs = 1.0
    if training.learning_rate is None:
        training.learning_rate = default_learning_rate(spec.tuning)
    if isinstance(spec, AlignmentJobSpec) and spec.method.beta is None:
        spec.method.beta = DEFAULT_BETA[spec.method.type]
    if distributed.processes_per_node is None:
        distributed.processes_per_node = max(distributed.gpus_per_node, 1)
    if training.batch_size.global_ is None:
        training.batch_size.global_ = training.batch_size.per_device * distributed.processes
    for source in (*spec.dataset.sources, *spec.dataset.eval_split.sources):
        source.uri = resolve_data_uri(source.uri)
    for function in reward_functions(spec):
        if function.path is not None:
            function.path = resolve_data_uri(function.path)
    return RunConfig(
        kind=job.kind,
        name=job.name,
        namespace=str(job.metadata.get("namespace", "")),
        spec=spec,
        paths=RunPaths(model=models["model"], models=models, output=output, data=data),
        metrics_port=metrics_port,
    )


# Where a training pod finds the ConfigMap of a reward function (`function.configMap`):
# <REWARD_FUNCTIONS_DIR>/<configMap name>/ is put on sys.path.
REWARD_FUNCTIONS_DIR = "/etc/lmforge/functions"

# How a training pod reports to the operator: keys of one ConfigMap per job, named by the
# env var below, which the job's pods may patch and nothing else (RBAC resourceNames).
REPORT_CONFIGMAP_ENV = "LMFORGE_REPORT_CONFIGMAP"
REPORT_PROGRESS = "progress"  # a kinds.Progress as JSON
REPORT_CHECKPOINT = "last-checkpoint"  # {"step", "path", "time"} as JSON

# Exit codes of `python -m lmforge.trainer run`: the operator classifies failures by them
# (together with the container's termination message, a JSON object with `reason`).
EXIT_BAD_CONFIG = 2  # the run config or the method does not fit: retrying cannot help
EXIT_BAD_DATA = 3  # malformed records: retrying cannot help
EXIT_OUT_OF_MEMORY = 4  # the accelerator ran out of memory
