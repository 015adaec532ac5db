"""The strategies that need a GPU: ZeRO-2/3/offload and QLoRA 4/8-bit, one GPU, with resume;
and LoRA over a bf16 base, alone and under ZeRO-3 (which casts the whole model to bf16);
and Liger's kernels (`training.ligerKernels`) training as the model's own code does.

Skipped without CUDA. Peak memory per strategy on a ~1B model: `make bench-gpu`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_sharded import LORA, TRAINING, _losses, _run, _write

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

CASES: dict[str, dict[str, Any]] = {
    "zero2": {"method": {"type": "full"}, "distributed": {"strategy": "zero2"}},
    "zero3": {"method": {"type": "full"}, "distributed": {"strategy": "zero3"}},
    "zero3-offload": {"method": {"type": "full"}, "distributed": {"strategy": "zero3-offload"}},
    "qlora-4bit": {"method": {"type": "qlora", "quantization": {"bits": 4}}},
    "qlora-8bit": {"method": {"type": "qlora", "quantization": {"bits": 8}}},
    "lora": {"method": {"type": "lora"}},
    "lora-zero3": {"method": {"type": "lora"}, "distributed": {"strategy": "zero3"}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trains_checkpoints_and_resumes_on_one_gpu(
    case: str, tiny_model: Path, tmp_path: Path
) -> None:
    changes = CASES[case]
    distributed = {"gpusPerNode": 1, **changes.get("distributed", {})}
    out = tmp_path / "out"
    for steps in (3, 6):
        path = _write(
            tmp_path,
            f"{case}-{steps}",
            tiny_model,
            method=changes["method"],
            distributed=distributed,
            training=TRAINING | {"maxSteps": steps, "precision": "bf16"},
        )
        metrics = _run(path, out)
    assert metrics["resumed_from_step"] == 3 and metrics["steps"] == 6
    assert metrics["strategy"] == distributed.get("strategy", "single")  # qlora: auto, 1 GPU
    assert metrics["peak_memory_bytes"] > 0
    assert metrics["precision"] == "bf16"
    if case == "lora":
        assert metrics["frozen_weights_dtype"] == "bfloat16", metrics
        assert metrics["trainable_weights_dtype"] == "float32", metrics


@pytest.mark.parametrize("case", ["full", "lora", "full-zero3"])
def test_liger_kernels_train_as_the_models_own(case: str, tiny_model: Path, tmp_path: Path) -> None:
    """The same 6 steps with and without Liger's kernels (fused RMSNorm, RoPE, SwiGLU, and
    the LM head with the loss in chunks; under ZeRO-3 the model's own head): the same
    losses up to bf16's rounding (the kernels sum in another order; a wrong shift of the
    labels or a lost normalisation moves the loss by far more than 3 %)."""
    losses = {}
    strategy = "zero3" if case.endswith("zero3") else "auto"
    for liger in (False, True):
        path = _write(
            tmp_path,
            f"{case}-liger-{str(liger).lower()}",
            tiny_model,
            method=LORA if case == "lora" else {"type": "full"},
            distributed={"gpusPerNode": 1, "strategy": strategy},
            training=TRAINING | {"maxSteps": 6, "precision": "bf16", "ligerKernels": liger},
        )
        out = tmp_path / f"out-{liger}"
        metrics = _run(path, out)
        assert metrics["steps"] == 6
        assert metrics["strategy"] == ("zero3" if strategy == "zero3" else "single")
        losses[liger] = _losses(out)
    assert len(losses[True]) == 6
    assert losses[True] == pytest.approx(losses[False], rel=3e-2), losses
