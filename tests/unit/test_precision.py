"""Mixed precision as the trainer sets it up: full fine-tuning keeps fp32 weights (the
optimizer updates them) and autocasts; adapter methods keep their frozen base in the 16-bit
compute dtype and train their own weights in fp32. CPU autocast to bf16 stands in for CUDA's
(the trainer's `auto` precision is fp32 on CPU, so `Precision("bf16")` is built here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from lmforge.trainer.model import (  # noqa: E402
    Precision,
    apply_method,
    load_model,
    load_pretrained,
    weight_dtypes,
)
from lmforge.trainer.recipes.reward import pair_accuracy  # noqa: E402
from lmforge.trainer.tiny import build_tiny_model  # noqa: E402

from lmforge.api.common import TrainingSpec, TuningMethod  # noqa: E402

BF16 = Precision("bf16")
ADAPTERS = ["lora", "dora", "adalora", "ia3", "prefix-tuning", "prompt-tuning"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def _model(path: Path, method: str, precision: Precision = BF16) -> Any:
    tuning = TuningMethod.model_validate({"type": method})
    model = load_model(str(path), method=tuning, training=TrainingSpec(), precision=precision)
    return apply_method(model, tuning, total_steps=10)


def _train_step(model: Any, ids: Any) -> Any:
    """One step's forward and backward under autocast, as the Trainer takes it."""
    model.train()
    with BF16.autocast(ids.device):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("method", ADAPTERS)
def test_adapters_train_in_fp32_over_a_16_bit_base(tiny: Path, method: str) -> None:
    model = _model(tiny, method)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert frozen and trainable
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in trainable} == {torch.float32}
    assert weight_dtypes(model) == {
        "trainable_weights_dtype": "float32",
        "frozen_weights_dtype": "bfloat16",
    }
    ids = torch.randint(3, 200, (2, 12))
    assert torch.isfinite(_train_step(model, ids))
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in frozen)
    # Generation outside autocast (held-out scoring, rollouts): 16-bit base, fp32 adapter.
    model.eval()
    out = model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("method", ["full", "lisa"])
def test_methods_that_update_the_base_keep_fp32_weights(tiny: Path, method: str) -> None:
    model = _model(tiny, method)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.isfinite(_train_step(model, torch.randint(3, 200, (2, 12))))


def test_fp32_runs_keep_everything_fp32(tiny: Path) -> None:
    model = _model(tiny, "lora", Precision("fp32"))
    assert weight_dtypes(model) == {
        "trainable_weights_dtype": "float32",
        "frozen_weights_dtype": "float32",
    }


def test_a_reward_models_new_head_trains_in_fp32(tiny: Path) -> None:
    """The score head PEFT trains beside the adapter is a copy of a 16-bit module: made fp32,
    and scored under autocast as the Trainer scores it (without, fp32 head and 16-bit
    hidden states would not multiply)."""
    from transformers import AutoModelForSequenceClassification

    tuning = TuningMethod.model_validate({"type": "lora"})
    model = load_pretrained(
        AutoModelForSequenceClassification,
        str(tiny),
        num_labels=1,
        dtype=BF16.weights_dtype(tuning),
    )
    model.config.pad_token_id = 0
    model = apply_method(model, tuning, total_steps=10, task_type="SEQ_CLS")
    heads = [n for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    assert heads
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    pairs = [("the cat sat on the mat", "mat the on sat cat the")] * 3
    assert 0.0 <= pair_accuracy(model, tokenizer, pairs, BF16) <= 1.0


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_reference_is_kept_in_the_compute_dtype(tiny: Path, tmp_path: Path, method: str) -> None:
    """A DPO/KTO/PPO reference is only ever multiplied by: under bf16 it is a bf16 copy, not
    a second set of fp32 weights beside full fine-tuning's policy (half the memory)."""
    from lmforge.trainer.model import load_reference

    from lmforge.api.kinds import TrainingJob
    from lmforge.api.validation import parse_object
    from lmforge.local import local_run_config

    job = parse_object(
        {
            "apiVersion": "lmforge.io/v1alpha1",
            "kind": "AlignmentJob",
            "metadata": {"name": "reference"},
            "spec": {
                "model": {"source": f"file://{tiny}"},
                "dataset": {"sources": [{"uri": "pairs.jsonl", "format": "preference"}]},
                "method": {"type": "dpo", "peft": {"type": method}},
            },
        }
    )
    assert isinstance(job, TrainingJob)
    config = local_run_config(job, tmp_path / "job.yaml", tmp_path / "out", tmp_path / "runs")
    for precision, dtype in ((BF16, torch.bfloat16), (Precision("fp32"), torch.float32)):
        reference = load_reference(config, precision)
        assert {p.dtype for p in reference.parameters()} == {dtype}
        assert not any(p.requires_grad for p in reference.parameters())
        assert not reference.training
