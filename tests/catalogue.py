"""Invalid custom resources, each with the field its rejection must name.

The same catalogue runs against local validation (unit tests) and against the
real API server (cluster tests), so the CRDs' schema/CEL and the Python models
cannot disagree without a test failing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

BASE: dict[str, dict[str, Any]] = {
    "FinetuneJob": {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": "cat-ftj"},
        "spec": {
            "model": {"source": "hf://org/model"},
            "dataset": {"sources": [{"uri": "data/train.jsonl"}]},
        },
    },
    "AlignmentJob": {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "AlignmentJob",
        "metadata": {"name": "cat-alj"},
        "spec": {
            "model": {"fromJob": {"name": "sft"}},
            "dataset": {"sources": [{"uri": "data/prefs.jsonl", "format": "preference"}]},
            "method": {"type": "dpo"},
        },
    },
    "InferenceService": {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "cat-isvc"},
        "spec": {
            "model": {"source": "hf://org/model"},
            "adapters": [{"name": "a", "fromJob": {"name": "sft"}}],
        },
    },
}

_DELETE = object()


@dataclass(frozen=True)
class Case:
    """An invalid object: BASE[kind] with `changes` applied (dotted paths; _DELETE removes)."""

    id: str
    kind: str
    changes: dict[str, Any]
    field: str  # the field path the error must name
    why: str = ""
    tags: tuple[str, ...] = field(default=())

    def build(self) -> dict[str, Any]:
        obj = copy.deepcopy(BASE[self.kind])
        for path, value in self.changes.items():
            _set(obj, path, value)
        return obj


def _set(obj: Any, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        key: Any = int(part) if part.isdigit() else part
        obj = obj.setdefault(key, {}) if isinstance(obj, dict) else obj[key]
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if value is _DELETE:
        del obj[last]
    elif isinstance(obj, list) and last == len(obj):
        obj.append(value)
    else:
        obj[last] = value


F, A, S = "FinetuneJob", "AlignmentJob", "InferenceService"

CASES: list[Case] = [
    # wrong types
    Case("lr-string", F, {"spec.training.learningRate": "fast"}, "spec.training.learningRate"),
    Case("epochs-bool", F, {"spec.training.epochs": "three"}, "spec.training.epochs"),
    Case("packing-list", F, {"spec.dataset.packing": ["yes"]}, "spec.dataset.packing"),
    Case("sources-object", F, {"spec.dataset.sources": {"uri": "x"}}, "spec.dataset.sources"),
    Case(
        "quantity-word",
        F,
        {"spec.resources.requests": {"memory": "lots"}},
        "spec.resources.requests.memory",
    ),
    # out of range
    Case("lr-negative", F, {"spec.training.learningRate": -1}, "spec.training.learningRate"),
    Case("lora-rank-zero", F, {"spec.method.lora": {"rank": 0}}, "spec.method.lora.rank"),
    Case("lora-dropout-1.5", F, {"spec.method.lora": {"dropout": 1.5}}, "spec.method.lora.dropout"),
    Case("weight-zero", F, {"spec.dataset.sources.0.weight": 0}, "spec.dataset.sources[0].weight"),
    Case("seq-len-8", F, {"spec.dataset.maxSeqLength": 8}, "spec.dataset.maxSeqLength"),
    Case("nodes-zero", F, {"spec.distributed": {"nodes": 0}}, "spec.distributed.nodes"),
    Case("gpus-17", F, {"spec.distributed": {"gpusPerNode": 17}}, "spec.distributed.gpusPerNode"),
    Case(
        "backoff-negative",
        F,
        {"spec.runPolicy": {"backoffLimit": -1}},
        "spec.runPolicy.backoffLimit",
    ),
    Case("keep-zero", F, {"spec.checkpoint": {"keep": 0}}, "spec.checkpoint.keep"),
    Case(
        "rope-factor-half",
        F,
        {"spec.training.ropeScaling": {"type": "linear", "factor": 0.5}},
        "spec.training.ropeScaling.factor",
    ),
    Case(
        "eval-fraction-0.9",
        F,
        {"spec.dataset.evalSplit": {"fraction": 0.9}},
        "spec.dataset.evalSplit.fraction",
    ),
    Case(
        "temperature-3", A, {"spec.generation": {"temperature": 3}}, "spec.generation.temperature"
    ),
    Case("no-sources", F, {"spec.dataset.sources": []}, "spec.dataset.sources"),
    # unknown enum values / patterns
    Case("method-lorax", F, {"spec.method": {"type": "lorax"}}, "spec.method.type"),
    Case(
        "format-csv", F, {"spec.dataset.sources.0.format": "csv"}, "spec.dataset.sources[0].format"
    ),
    Case("template-llama2", F, {"spec.model.chatTemplate": "llama2"}, "spec.model.chatTemplate"),
    Case(
        "strategy-horovod",
        F,
        {"spec.distributed": {"strategy": "horovod"}},
        "spec.distributed.strategy",
    ),
    Case("precision-fp8", F, {"spec.training.precision": "fp8"}, "spec.training.precision"),
    Case(
        "bits-3",
        F,
        {"spec.method": {"type": "qlora", "quantization": {"bits": 3}}},
        "spec.method.quantization.bits",
    ),
    Case(
        "toleration-maybe",
        F,
        {"spec.scheduling": {"tolerations": [{"operator": "Maybe"}]}},
        "spec.scheduling.tolerations[0].operator",
    ),
    Case("source-http", F, {"spec.model.source": "http://example.com/model"}, "spec.model.source"),
    Case(
        "queue-uppercase",
        F,
        {"spec.scheduling": {"queueName": "Bad_Queue"}},
        "spec.scheduling.queueName",
    ),
    Case(
        "fromjob-kind",
        F,
        {"spec.model": {"fromJob": {"kind": "InferenceService", "name": "x"}}},
        "spec.model.fromJob.kind",
    ),
    Case("alignment-rlhf", A, {"spec.method.type": "rlhf"}, "spec.method.type"),
    Case("runtime-tgi", S, {"spec.runtime": "tgi"}, "spec.runtime"),
    Case("adapter-name-space", S, {"spec.adapters.0.name": "Bad Name"}, "spec.adapters[0].name"),
    Case("unknown-field", F, {"spec.training.learningRat": 0.1}, "spec.training.learningRat"),
    # missing required fields
    Case("no-dataset", F, {"spec.dataset": _DELETE}, "spec.dataset"),
    Case("no-model", F, {"spec.model": _DELETE}, "spec.model"),
    Case("no-alignment-method", A, {"spec.method": _DELETE}, "spec.method"),
    Case("no-adapter-name", S, {"spec.adapters.0.name": _DELETE}, "spec.adapters[0].name"),
    Case(
        "rope-no-type",
        F,
        {"spec.training.ropeScaling": {"factor": 2}},
        "spec.training.ropeScaling.type",
    ),
    Case(
        "autoscaling-no-max", S, {"spec.autoscaling": {"target": 4}}, "spec.autoscaling.maxReplicas"
    ),
    # contradictory combinations (CEL)
    Case("source-and-fromjob", F, {"spec.model.fromJob": {"name": "other"}}, "spec.model.source"),
    Case(
        "neither-source-nor-fromjob",
        F,
        {"spec.model": {"chatTemplate": "chatml"}},
        "spec.model.source",
    ),
    Case(
        "qlora-no-quantization", F, {"spec.method": {"type": "qlora"}}, "spec.method.quantization"
    ),
    Case(
        "lora-with-quantization",
        F,
        {"spec.method": {"type": "lora", "quantization": {"bits": 4}}},
        "spec.method.quantization",
    ),
    Case(
        "merge-full",
        F,
        {"spec.method": {"type": "full", "mergeOnExport": True}},
        "spec.method.mergeOnExport",
    ),
    Case(
        "adalora-ranks",
        F,
        {"spec.method": {"type": "adalora", "adalora": {"initialRank": 4, "targetRank": 8}}},
        "spec.method.adalora.targetRank",
    ),
    Case(
        "epochs-and-steps",
        F,
        {"spec.training.epochs": 1, "spec.training.maxSteps": 10},
        "spec.training.maxSteps",
    ),
    Case(
        "global-batch-indivisible",
        F,
        {"spec.training.batchSize": {"perDevice": 4, "global": 10}},
        "spec.training.batchSize.global",
    ),
    Case(
        "global-batch-multinode",
        F,
        {
            "spec.training.batchSize": {"perDevice": 1, "global": 24},
            "spec.distributed": {"nodes": 2, "gpusPerNode": 8},
        },
        "spec.training.batchSize.global",
        why="24 is not a multiple of 1 x 2 x 8",
    ),
    Case(
        "zero3-two-cpu-processes",
        F,
        {"spec.distributed": {"strategy": "zero3", "gpusPerNode": 0, "processesPerNode": 2}},
        "spec.distributed.gpusPerNode",
    ),
    Case(
        "procs-ne-gpus",
        F,
        {"spec.distributed": {"gpusPerNode": 8, "processesPerNode": 4}},
        "spec.distributed.processesPerNode",
    ),
    Case(
        "cpt-alpaca",
        F,
        {"spec.task": "continued-pretraining", "spec.dataset.sources.0.format": "alpaca"},
        "spec.dataset.sources",
    ),
    Case(
        "output-both",
        F,
        {"spec.output": {"existingClaim": "out", "create": {"size": "1Gi"}}},
        "spec.output.create",
    ),
    Case("name-too-long", F, {"metadata.name": "a" * 60}, "metadata.name"),
    Case(
        "grpo-no-reward",
        A,
        {"spec.method": {"type": "grpo"}, "spec.dataset.sources.0.format": "prompt"},
        "spec.method.rewards",
    ),
    Case(
        "grpo-group-of-one",
        A,
        {
            "spec.method": {"type": "grpo", "rewards": [{"rule": {"type": "length-penalty"}}]},
            "spec.dataset.sources.0.format": "prompt",
            "spec.generation": {"samplesPerPrompt": 1},
        },
        "spec.generation.samplesPerPrompt",
    ),
    Case(
        "reward-two-kinds",
        A,
        {
            "spec.method": {
                "type": "grpo",
                "rewards": [{"rule": {"type": "length-penalty"}, "function": {"function": "m:f"}}],
            },
            "spec.dataset.sources.0.format": "prompt",
        },
        "spec.method.rewards[0].model",
    ),
    Case(
        "regex-rule-without-pattern",
        A,
        {
            "spec.method": {"type": "grpo", "rewards": [{"rule": {"type": "regex"}}]},
            "spec.dataset.sources.0.format": "prompt",
        },
        "spec.method.rewards[0].rule.pattern",
    ),
    Case("dpo-alpaca", A, {"spec.dataset.sources.0.format": "alpaca"}, "spec.dataset.sources"),
    Case("kto-preference", A, {"spec.method.type": "kto"}, "spec.dataset.sources"),
    Case(
        "align-prompt-tuning",
        A,
        {"spec.method.peft": {"type": "prompt-tuning"}},
        "spec.method.peft.type",
    ),
    Case(
        "autoscaling-min-max",
        S,
        {"spec.autoscaling": {"minReplicas": 5, "maxReplicas": 2, "target": 8}},
        "spec.autoscaling.minReplicas",
    ),
    Case(
        "replicas-and-autoscaling",
        S,
        {"spec.replicas": 2, "spec.autoscaling": {"maxReplicas": 3, "target": 8}},
        "spec.autoscaling",
    ),
    Case(
        "tp-exceeds-gpus", S, {"spec.serving": {"tensorParallel": 4}}, "spec.serving.tensorParallel"
    ),
    Case(
        "adapter-duplicate",
        S,
        {"spec.adapters.1": {"name": "a", "source": "hf://o/b"}},
        "spec.adapters",
    ),
    Case("adapter-both", S, {"spec.adapters.0.source": "hf://o/a"}, "spec.adapters[0].source"),
]
