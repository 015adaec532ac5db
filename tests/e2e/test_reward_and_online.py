"""Reward models and online alignment (GRPO, RLOO) on the tiny task, through `lmforge run`.

The chain the examples document: a briefly fine-tuned policy -> a reward model on preference
pairs -> GRPO and RLOO scored by a dense verifiable reward (a user function), and GRPO scored
by the reward-model job, with the task's true reward reported beside it (weight 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import DATA, ROOT, kill_at_checkpoint, lmforge

pytestmark = pytest.mark.slow

REWARDS = ROOT / "examples" / "rewards"
WORDS = {  # dense true reward: share of digit words right (examples/rewards/spelling.py)
    "name": "words",
    "function": {"function": "spelling:word_accuracy", "path": str(REWARDS)},
}
EXACT = {"name": "exact", "rule": {"type": "exact-match", "column": "answer"}}


def job(kind: str, name: str, spec: dict[str, Any], runs: Path) -> Path:
    path = runs / f"{name}.yaml"
    document = {"apiVersion": "lmforge.io/v1alpha1", "kind": kind, "metadata": {"name": name}}
    path.write_text(yaml.safe_dump(document | {"spec": spec}, sort_keys=False))
    return path


def run(path: Path, runs: Path) -> dict[str, Any]:
    proc = lmforge("run", str(path), cwd=runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kind = yaml.safe_load(path.read_text())["kind"].lower()
    out = runs / "lmforge-runs" / kind / path.stem
    return dict(json.loads((out / "metrics.json").read_text()))


def online_spec(method: str, rewards: list[dict[str, Any]], **training: Any) -> dict[str, Any]:
    return {
        "model": {"fromJob": {"kind": "FinetuneJob", "name": "policy"}},
        "dataset": {
            "sources": [{"uri": str(DATA / "tiny-prompts-train.jsonl")}],
            "evalSplit": {"sources": [{"uri": str(DATA / "tiny-prompts-eval.jsonl")}]},
            "maxSeqLength": 64,
        },
        "method": {"type": method, "rewards": rewards},
        "generation": {"maxNewTokens": 12, "samplesPerPrompt": 8, "temperature": 0.7},
        "training": {"maxSteps": 30, "learningRate": 1e-3, "batchSize": {"perDevice": 8}}
        | training,
        "distributed": {"gpusPerNode": 0},
    }


def finetune(name: str, steps: int, runs: Path, tiny_model: Path) -> None:
    spec = {
        "model": {"source": f"file://{tiny_model}", "chatTemplate": "chatml"},
        "dataset": {
            "sources": [{"uri": str(DATA / "tiny-task-train.jsonl"), "format": "openai"}],
            "maxSeqLength": 64,
        },
        "method": {"type": "full"},
        "training": {"maxSteps": steps, "learningRate": 3e-3, "batchSize": {"perDevice": 32}},
        "distributed": {"gpusPerNode": 0},
    }
    run(job("FinetuneJob", name, spec, runs), runs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A folder with a finished FinetuneJob `policy`: the tiny model fine-tuned so briefly
    that it spells about a third of the digit words right (the online methods start here)."""
    folder = tmp_path_factory.mktemp("alignment")
    finetune("policy", 40, folder, tiny_model)
    return folder


@pytest.fixture(scope="module")
def reward_model(runs: Path, tiny_model: Path) -> dict[str, Any]:
    """AlignmentJob `reward`: a reward model on 4000 preference pairs of the tiny task, from a
    fully fine-tuned model (a 2-layer model needs that start and that many pairs for >= 90 %
    held-out pair accuracy; on the bundled 1000 pairs it overfits at about 80 %)."""
    from lmforge.trainer.tiny import preference_records

    finetune("speller", 400, runs, tiny_model)
    pairs = runs / "preferences.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_records(4000, 1)))
    spec = {
        "model": {"fromJob": {"kind": "FinetuneJob", "name": "speller"}},
        "dataset": {
            "sources": [{"uri": str(pairs), "format": "preference"}],
            "evalSplit": {"sources": [{"uri": str(DATA / "tiny-preferences-eval.jsonl")}]},
            "maxSeqLength": 64,
        },
        "method": {"type": "reward-model", "peft": {"type": "full"}},
        "training": {"maxSteps": 500, "learningRate": 1e-3, "batchSize": {"perDevice": 32}},
        "distributed": {"gpusPerNode": 0},
    }
    return run(job("AlignmentJob", "reward", spec, runs), runs)


def test_reward_model_ranks_held_out_pairs(runs: Path, reward_model: dict[str, Any]) -> None:
    import torch
    from lmforge.trainer.rewards import RewardModelScore

    assert reward_model["pair_accuracy"] >= 0.9, reward_model
    # final/ is a plain sequence-classification model that later jobs load as it is
    scorer = RewardModelScore(str(runs / "lmforge-runs" / "alignmentjob" / "reward" / "final"))
    prompt = [{"role": "user", "content": "spell: 3 1 4"}]
    with torch.no_grad():
        good, bad = scorer([prompt, prompt], ["three one four", "three one five"], {})
    assert good > bad


def test_grpo_resumes_after_sigkill_and_reports_every_reward_component(runs: Path) -> None:
    spec = online_spec("grpo", [WORDS, {**EXACT, "weight": 0}], maxSteps=20)
    spec["checkpoint"] = {"everySteps": 5, "keep": 2}
    path = job("AlignmentJob", "grpo", spec, runs)
    ckpts = runs / "lmforge-runs" / "alignmentjob" / "grpo" / "checkpoints"
    killed_at = kill_at_checkpoint(path, checkpoint_dir=ckpts, cwd=runs, at_least=5)
    assert killed_at < 20

    metrics = run(path, runs)
    assert metrics["resumed_from_step"] == killed_at
    assert metrics["steps"] == 20
    # the total (weighted) and each component, before and after, on the held-out prompts
    assert metrics["reward_before"] == pytest.approx(metrics["reward_before/words"])
    assert 0 < metrics["reward_before/words"] < 1
    assert 0 <= metrics["reward_after/exact"] <= 1
    assert "reward_after/words" in metrics


def test_rloo_runs_with_the_same_reward_plumbing(runs: Path) -> None:
    spec = online_spec("rloo", [WORDS], maxSteps=5)
    metrics = run(job("AlignmentJob", "rloo", spec, runs), runs)
    assert metrics["steps"] == 5
    assert metrics["reward_before"] == pytest.approx(metrics["reward_before/words"])
    final = runs / "lmforge-runs" / "alignmentjob" / "rloo" / "final"
    assert (final / "adapter_config.json").is_file()  # the default peft: a LoRA adapter


def test_grpo_scores_rollouts_with_a_reward_model_job(
    runs: Path, reward_model: dict[str, Any]
) -> None:
    learned = {"name": "learned", "model": {"fromJob": {"kind": "AlignmentJob", "name": "reward"}}}
    spec = online_spec("grpo", [learned, {**WORDS, "weight": 0}], maxSteps=5)
    metrics = run(job("AlignmentJob", "grpo-learned", spec, runs), runs)
    assert metrics["steps"] == 5
    # the learned reward is the total; the task's true reward is reported beside it
    assert metrics["reward_before"] == pytest.approx(metrics["reward_before/learned"])
    assert metrics["reward_after/words"] >= 0


def test_raft_on_a_reward_model_job_improves_the_true_reward(
    runs: Path, reward_model: dict[str, Any]
) -> None:
    """The chain: SFT policy -> reward model -> RAFT scored by the reward model alone. The
    task's true reward (weight 0, reported beside it) of the policy's own samples rises with
    the learned one, and the held-out true reward is not traded for it.

    Measured (four rounds; the policy's samples' word accuracy by round, then the held-out
    greedy one before -> after): 0.22 -> 0.30 and 0.308 -> 0.326 at learning rate 1e-3;
    0.22 -> 0.30 and 0.308 -> 0.308 at 2e-3; 8 rounds 0.22 -> 0.32, 0.308 -> 0.320. Held out
    the true reward moves by under 0.02 either way at these settings, box to box, so it is
    checked only for not falling. Sampling at temperature 1.0 hacks the learned reward: its
    samples stay at 0.14 and the held-out accuracy falls to 0.22; GRPO on the same learned
    reward (80 steps at beta 0) took word accuracy from 0.31 to 0.06."""
    learned = {"name": "learned", "model": {"fromJob": {"kind": "AlignmentJob", "name": "reward"}}}
    spec = online_spec(
        "raft", [learned, {**WORDS, "weight": 0}], learningRate=1e-3, batchSize={"perDevice": 32}
    )
    spec["method"] |= {"raft": {"iterations": 4}, "peft": {"type": "full"}}
    metrics = run(job("AlignmentJob", "raft-learned", spec, runs), runs)
    assert metrics["reward_after/learned"] > metrics["reward_before/learned"] + 1, metrics
    samples = [r["components"]["words"] for r in metrics["rounds"]]
    assert samples[-1] > samples[0] + 0.05, samples
    assert metrics["reward_after/words"] > metrics["reward_before/words"] - 0.02, metrics
