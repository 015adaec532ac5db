"""The DPO family and KTO learn the tiny task's preferences (the right spelling over a near
miss) on held-out pairs, and resume after a SIGKILL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lmforge.api.kinds import TrainingJob
from lmforge.api.validation import parse_object
from lmforge.local import local_run_config
from tests.e2e.conftest import DATA, kill_at_checkpoint, lmforge

pytestmark = pytest.mark.slow

# A short SFT warm start (half the demo's steps, full fine-tuning) ranks the held-out pairs right
# by likelihood but has no preference margin over itself yet; each method then trains briefly.
SFT_STEPS = 400
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}
# method -> (steps, learning rate); TRL's default learning rates (1e-6) teach a tiny model nothing.
# Held-out preference accuracy measured with these settings (and BETAS): dpo 97.5 %, ipo 98 %,
# kto 99 %; simpo 100 % and orpo 98.5 % after 200 SFT steps.
METHODS = {
    "dpo": (150, 2e-3),
    "ipo": (100, 2e-3),
    "kto": (150, 2e-3),
    "simpo": (30, 1e-3),
    "orpo": (30, 1e-3),
}


def _job(kind: str, name: str, spec: dict[str, Any]) -> TrainingJob:
    job = parse_object(
        {
            "apiVersion": "lmforge.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        }
    )
    assert isinstance(job, TrainingJob)
    return job


def _run_here(job: TrainingJob, out: Path) -> dict[str, Any]:
    """The job's run config and recipe, in this process (what the trainer pod runs)."""
    from lmforge.trainer.recipes import run_recipe

    config = local_run_config(job, out / "job.yaml", out, out / "runs")
    config.output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    return run_recipe(config)


@pytest.fixture(scope="module")
def sft_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sft")
    _run_here(
        _job(
            "FinetuneJob",
            "warm-start",
            {
                "model": {"source": f"file://{tiny_model}", "chatTemplate": "chatml"},
                "dataset": {
                    "sources": [{"uri": str(DATA / "tiny-task-train.jsonl")}],
                    "maxSeqLength": 64,
                },
                "method": {"type": "full"},
                "training": {
                    "maxSteps": SFT_STEPS,
                    "learningRate": 3e-3,
                    "warmupRatio": 0.05,
                    "batchSize": {"perDevice": 32},
                    "loggingEverySteps": 50,
                },
                "distributed": {"gpusPerNode": 0},
            },
        ),
        out,
    )
    return out / "final"


# IPO regresses the per-token log-ratio margin onto 1/(2 beta): with the default beta 0.1 that
# target (5 nats a token) is far beyond what 60 LoRA steps reach and accuracy stalls near 87 %;
# beta 0.5 (target 1) separates the held-out pairs (94 % at 60 steps, 98 % at 100). DPO and
# KTO pass beta x log-ratio through a sigmoid: at the default 0.1 their accuracy depended on
# the machine's arithmetic (60 steps, three boxes: dpo 95.5 % to 91.5 %, kto 98 % to 88.5 %;
# dpo plateaus near 91 % on the last one). dpo at beta 0.5 and kto at 1.0 measured 97.5 % and
# 99 % at 150 steps there.
BETAS = {"ipo": 0.5, "dpo": 0.5, "kto": 1.0}


def _alignment_spec(model: Path, method: str, steps: int = 60, lr: float = 1e-3) -> dict[str, Any]:
    beta = {"beta": BETAS[method]} if method in BETAS else {}
    return {
        "model": {"source": f"file://{model}"},
        "dataset": {
            "sources": [{"uri": str(DATA / "tiny-preferences-train.jsonl")}],
            "evalSplit": {"sources": [{"uri": str(DATA / "tiny-preferences-eval.jsonl")}]},
            "maxSeqLength": 64,
        },
        "method": {"type": method, "peft": {"type": "lora", "lora": LORA}, **beta},
        "training": {
            "maxSteps": steps,
            "learningRate": lr,
            "batchSize": {"perDevice": 16},
            "loggingEverySteps": 20,
        },
        "distributed": {"gpusPerNode": 0},
    }


@pytest.mark.parametrize("method", list(METHODS))
def test_method_learns_held_out_preferences(method: str, sft_model: Path, tmp_path: Path) -> None:
    out = tmp_path / method
    steps, lr = METHODS[method]
    metrics = _run_here(
        _job("AlignmentJob", method, _alignment_spec(sft_model, method, steps, lr)), out
    )
    assert metrics["eval_pairs"] == 200
    assert metrics["preference_accuracy"] >= 0.90, metrics
    if method != "orpo":
        # the method's own reward margin grew (simpo ranks by likelihood, already right after
        # SFT). ORPO from an SFT start is mostly more SFT: 30 steps keep its margin about flat
        # (measured 0.262 after, 0.270 before), so only its accuracy is checked.
        assert metrics["reward_margin"] > metrics["reward_margin_before"], metrics
    assert metrics["steps"] == steps
    written = json.loads((out / "metrics.json").read_text())
    assert written["preference_accuracy"] == pytest.approx(metrics["preference_accuracy"])
    # final/ is an adapter on the SFT model it started from
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == sft_model


def test_an_adapter_start_model_is_merged_and_kept_as_base(
    tiny_model: Path, tmp_path: Path
) -> None:
    """An AlignmentJob after a LoRA FinetuneJob: final/ applies on base/ (SFT merged in)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    sft = tmp_path / "sft"
    _run_here(
        _job(
            "FinetuneJob",
            "lora-sft",
            {
                "model": {"source": f"file://{tiny_model}"},
                "dataset": {
                    "sources": [{"uri": str(DATA / "tiny-task-train.jsonl")}],
                    "maxSeqLength": 64,
                },
                "method": {"type": "lora", "lora": LORA},
                "training": {"maxSteps": 2, "batchSize": {"perDevice": 4}, "learningRate": 3e-3},
                "distributed": {"gpusPerNode": 0},
            },
        ),
        sft,
    )
    out = tmp_path / "dpo"
    spec = _alignment_spec(sft / "final", "dpo")
    spec["training"] = {"maxSteps": 2, "batchSize": {"perDevice": 4}}
    spec["dataset"]["evalSplit"] = {"sources": []}
    metrics = _run_here(_job("AlignmentJob", "dpo-on-lora", spec), out)
    assert metrics["steps"] == 2
    assert (out / "base" / "config.json").exists()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    aligned = AutoPeftModelForCausalLM.from_pretrained(out / "final")
    start = AutoPeftModelForCausalLM.from_pretrained(sft / "final")
    raw = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad(), aligned.disable_adapter():
        start_logits = aligned(input_ids=ids).logits
        assert torch.allclose(start_logits, start(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(start_logits, raw(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("method", ["dpo", "kto", "reward-model"])
def test_sigkill_then_resume(method: str, tiny_model: Path, tmp_path: Path) -> None:
    spec = _alignment_spec(tiny_model, method)
    spec["dataset"]["evalSplit"] = {"sources": []}
    spec["training"] = {"maxSteps": 16, "batchSize": {"perDevice": 4}, "learningRate": 1e-3}
    spec["checkpoint"] = {"everySteps": 2, "keep": 2}
    path = tmp_path / f"{method}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "lmforge.io/v1alpha1",
                "kind": "AlignmentJob",
                "metadata": {"name": f"resume-{method}"},
                "spec": spec,
            }
        )
    )
    out = tmp_path / "out"
    killed_at = kill_at_checkpoint(
        path, "--output", str(out), checkpoint_dir=out / "checkpoints", cwd=tmp_path, at_least=4
    )
    assert killed_at < 16

    rerun = lmforge("run", str(path), "--output", str(out), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == killed_at
    assert metrics["steps"] == 16
    # a reward model is exported merged, as later jobs load it; the others as adapters
    weights = "model.safetensors" if method == "reward-model" else "adapter_model.safetensors"
    assert (out / "final" / weights).exists()
