"""Adapter runs in bf16 end to end, through each Trainer-based recipe: the frozen base in bf16,
the adapter (and a reward model's head) trained in fp32 under autocast, checkpoints, held-out
scoring and export. On a GPU `auto` precision is bf16; here the recipes are told bf16 and CPU
autocast stands in for CUDA's (the memory and speed this buys are the GPU benchmark's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lmforge.trainer import policy
from lmforge.trainer.model import Precision
from lmforge.trainer.recipes import kto, online, preference, reward, run_recipe, sft

from lmforge.api.kinds import TrainingJob
from lmforge.api.validation import parse_object
from lmforge.local import local_run_config
from tests.e2e.conftest import DATA

pytestmark = pytest.mark.slow

LORA = {"type": "lora", "lora": {"rank": 8, "alpha": 16, "targetModules": ["all-linear"]}}


def _dataset(train: str, evaluation: str | None = None, **extra: Any) -> dict[str, Any]:
    held_out = [{"uri": str(DATA / evaluation), **extra}] if evaluation else []
    return {
        "sources": [{"uri": str(DATA / train), **extra}],
        "evalSplit": {"sources": held_out},
        "maxSeqLength": 64,
    }


JOBS: dict[str, tuple[str, dict[str, Any]]] = {
    "sft": (
        "FinetuneJob",
        {
            "dataset": _dataset("tiny-task-train.jsonl", "tiny-task-eval.jsonl"),
            "method": {**LORA, "mergeOnExport": True},
            "evaluation": {"metric": "exact-match", "maxSamples": 8},
        },
    ),
    "reward-model": (
        "AlignmentJob",
        {
            "dataset": _dataset("tiny-preferences-train.jsonl", "tiny-preferences-eval.jsonl"),
            "method": {"type": "reward-model", "peft": LORA},
        },
    ),
    "dpo": (
        "AlignmentJob",
        {
            "dataset": _dataset("tiny-preferences-train.jsonl"),
            "method": {"type": "dpo", "peft": LORA},
        },
    ),
    "kto": (
        "AlignmentJob",
        {"dataset": _dataset("tiny-kto-train.jsonl"), "method": {"type": "kto", "peft": LORA}},
    ),
    "grpo": (
        "AlignmentJob",
        {
            "dataset": _dataset("tiny-prompts-train.jsonl", format="prompt"),
            "method": {
                "type": "grpo",
                "peft": LORA,
                "beta": 0.0,
                "rewards": [{"name": "exact", "rule": {"type": "exact-match", "column": "answer"}}],
            },
            "generation": {"maxNewTokens": 6, "samplesPerPrompt": 4},
        },
    ),
}
# raft and ppo step their own loops, under the run's autocast (trainer/policy.py).
ONLINE: dict[str, Any] = {
    "dataset": _dataset("tiny-prompts-train.jsonl", "tiny-prompts-eval.jsonl", format="prompt"),
    "generation": {"maxNewTokens": 6, "samplesPerPrompt": 2},
    "evaluation": {"maxSamples": 8},
}
REWARDS = [{"name": "exact", "rule": {"type": "exact-match", "column": "answer"}}]
JOBS["raft"] = (
    "AlignmentJob",
    ONLINE
    | {"method": {"type": "raft", "peft": LORA, "rewards": REWARDS, "raft": {"iterations": 2}}},
)
JOBS["ppo"] = (
    "AlignmentJob",
    ONLINE | {"method": {"type": "ppo", "peft": LORA, "rewards": REWARDS, "beta": 0.1}},
)


def _bf16_run(
    monkeypatch: pytest.MonkeyPatch, out: Path, kind: str, spec: dict[str, Any]
) -> dict[str, Any]:
    """Run a job's recipe in this process with the trainer's precision resolved to bf16."""
    for recipe in (sft, reward, preference, kto, online, policy):
        monkeypatch.setattr(recipe, "resolve_precision", lambda requested: Precision("bf16"))
    job = parse_object(
        {
            "apiVersion": "lmforge.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": "bf16"},
            "spec": spec,
        }
    )
    assert isinstance(job, TrainingJob)
    config = local_run_config(job, out / "job.yaml", out, out / "runs")
    config.output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    run_recipe(config)
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == "bf16"
    assert metrics["frozen_weights_dtype"] == "bfloat16", metrics
    assert metrics["trainable_weights_dtype"] == "float32", metrics
    return metrics


def _spec(model: Path, **spec: Any) -> dict[str, Any]:
    return {
        "model": {"source": f"file://{model}", "chatTemplate": "chatml"},
        "training": {"maxSteps": 2, "batchSize": {"perDevice": 4}},
        "distributed": {"gpusPerNode": 0},
        **spec,
    }


@pytest.mark.parametrize("objective", list(JOBS))
def test_adapter_recipes_train_in_bf16(
    objective: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind, spec = JOBS[objective]
    metrics = _bf16_run(monkeypatch, tmp_path, kind, _spec(tiny_model, **spec))
    assert metrics["steps"] == 2
    if objective == "ppo":
        # The new adapter starts as a no-op: the policy and the reference (the adapter
        # switched off) score the first rollouts alike.
        assert metrics["rounds"][0]["kl"] == 0.0, metrics["rounds"][0]
    final = tmp_path / "final"
    assert (final / "adapter_model.safetensors").exists() or (final / "model.safetensors").exists()


def test_a_bf16_adapter_run_resumes_from_its_checkpoint(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint holds the fp32 adapter; the resumed run loads it over a bf16 base."""
    from safetensors.torch import load_file

    kind, spec = JOBS["sft"]
    spec = _spec(tiny_model, **spec, checkpoint={"everySteps": 2, "keep": 2})
    _bf16_run(monkeypatch, tmp_path, kind, spec)
    saved = tmp_path / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"
    assert {t.dtype for t in load_file(saved).values()} == {torch.float32}
    spec["training"]["maxSteps"] = 4
    metrics = _bf16_run(monkeypatch, tmp_path, kind, spec)
    assert metrics["resumed_from_step"] == 2
    assert metrics["steps"] == 4
