"""`training.ligerKernels`: what it swaps in, and the clear errors where it cannot.

Liger's kernels are Triton kernels and run on CUDA only, so here (no GPU) the swap is
checked by what it replaces, with CUDA reported present; that training with them matches
training without is a `gpu` test (tests/e2e/test_sharded_gpu.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lmforge.trainer.model import MethodError, load_model, load_pretrained  # noqa: E402
from lmforge.trainer.tiny import build_tiny_model  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from lmforge.api.common import TrainingSpec, TuningMethod  # noqa: E402

FULL = TuningMethod.model_validate({"type": "full"})
LIGER = TrainingSpec.model_validate({"ligerKernels": True})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def cuda_reported(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """CUDA reported present; Liger's module-wide swaps in transformers' Llama undone after
    (the rest of the session runs Llama on the CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    saved = dict(vars(modeling_llama))
    yield
    for name, value in saved.items():
        setattr(modeling_llama, name, value)


def _load(path: Path) -> object:
    from lmforge.trainer.model import Precision

    return load_model(str(path), method=FULL, training=LIGER, precision=Precision("fp32"))


def test_refused_without_a_gpu(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MethodError, match=r"training\.ligerKernels: .*CUDA"):
        _load(tiny)


def test_a_causal_lm_gets_the_fused_kernels_and_head(tiny: Path, cuda_reported: None) -> None:
    from liger_kernel.transformers.model.llama import lce_forward
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    model = _load(tiny)
    layer = model.model.layers[0]  # type: ignore[attr-defined]
    assert layer.input_layernorm.forward.__func__ is LigerRMSNorm.forward
    assert model.model.norm.forward.__func__ is LigerRMSNorm.forward  # type: ignore[attr-defined]
    assert layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward
    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    assert model.forward.__func__ is lce_forward  # type: ignore[attr-defined]


def test_a_reward_model_keeps_its_own_head(tiny: Path, cuda_reported: None) -> None:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from lmforge.trainer.model import use_liger_kernels

    model = load_pretrained(AutoModelForSequenceClassification, str(tiny), num_labels=1)
    own_forward = type(model).forward
    use_liger_kernels(model)
    assert model.model.norm.forward.__func__ is LigerRMSNorm.forward
    assert model.forward.__func__ is own_forward


@pytest.mark.parametrize("strategy", ["zero3", "zero3-offload"])
def test_under_zero3_the_head_stays_the_models_own(
    tiny: Path, cuda_reported: None, strategy: str
) -> None:
    """ZeRO-3 partitions the head's weight, which Liger's fused loss would read outside the
    head's forward (where DeepSpeed gathers it): the rest of the kernels only."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from lmforge.trainer.model import Precision

    model = load_model(
        str(tiny), method=FULL, training=LIGER, precision=Precision("fp32"), strategy=strategy
    )
    assert model.model.norm.forward.__func__ is LigerRMSNorm.forward  # type: ignore[attr-defined]
    assert "forward" not in vars(model)  # the class's own forward


def test_a_model_type_liger_does_not_cover_is_named(cuda_reported: None) -> None:
    from lmforge.trainer.model import use_liger_kernels
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(MethodError, match=r"training\.ligerKernels: .*'gpt2'.*llama"):
        use_liger_kernels(model)
