"""Every tuning method trains a few steps on the tiny model and exports a loadable result."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lmforge.trainer.model import MethodError
from lmforge.trainer.recipes.sft import run

from lmforge.api.validation import load_file
from lmforge.local import local_run_config

pytestmark = pytest.mark.slow


def _train(write_job: Callable[..., Path], tmp_path: Path, **spec: Any) -> tuple[dict, Path]:
    path = write_job(**spec)
    (job,) = load_file(path)
    config = local_run_config(job, path, tmp_path / "out", tmp_path / "runs")
    return run(config), config.output_dir


def _generate(model: Any, tokenizer: Any) -> str:
    ids = tokenizer(
        "<|im_start|>user\nspell: 1 2 3<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt"
    ).input_ids
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
    )
    return str(tokenizer.decode(out[0]))


@pytest.mark.parametrize(
    "method",
    [
        {"type": "lora", "lora": {"targetModules": ["q_proj", "v_proj"]}},
        {"type": "dora"},
        {"type": "ia3"},
        {"type": "adalora", "adalora": {"initialRank": 8, "targetRank": 4}},
        {"type": "prefix-tuning", "virtualTokens": {"numVirtualTokens": 4}},
        {"type": "prompt-tuning", "virtualTokens": {"numVirtualTokens": 4}},
    ],
    ids=lambda m: m["type"],
)
def test_adapter_methods(write_job: Callable[..., Path], tmp_path: Path, method: dict) -> None:
    from peft import AutoPeftModelForCausalLM, PeftConfig
    from transformers import AutoTokenizer

    metrics, out = _train(write_job, tmp_path, method=method)
    assert metrics["steps"] == 4
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    final = out / "final"
    assert PeftConfig.from_pretrained(final).peft_type.value.replace("_", "-").lower() in (
        method["type"].replace("dora", "lora"),
        method["type"].replace("-", "_").replace("_", "-"),
    )
    model = AutoPeftModelForCausalLM.from_pretrained(final)
    assert _generate(model, AutoTokenizer.from_pretrained(final))
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_full_and_lisa_change_the_model(
    write_job: Callable[..., Path], tmp_path: Path, tiny_model: Path
) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    _, out = _train(
        write_job,
        tmp_path,
        method={"type": "lisa", "lisa": {"activeLayers": 1, "intervalSteps": 2}},
    )
    tuned = AutoModelForCausalLM.from_pretrained(out / "final")
    changed = {
        name for name, p in tuned.named_parameters() if not torch.equal(p, base.get_parameter(name))
    }
    # LISA trains embeddings and head always, and some but not all decoder layers.
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    layers = {n.split(".")[2] for n in changed if n.startswith("model.layers.")}
    assert layers and len(layers) <= 2


def test_merge_on_export(write_job: Callable[..., Path], tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    _, out = _train(write_job, tmp_path, method={"type": "lora", "mergeOnExport": True})
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    adapter = AutoPeftModelForCausalLM.from_pretrained(out / "final")
    ids = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-4, rtol=1e-4)


def test_continued_pretraining_on_raw_text(write_job: Callable[..., Path], tmp_path: Path) -> None:
    corpus = Path(__file__).resolve().parents[2] / "examples" / "data" / "tiny-corpus.txt"
    metrics, out = _train(
        write_job,
        tmp_path,
        task="continued-pretraining",
        method={"type": "full"},
        dataset={
            "sources": [{"uri": str(corpus), "format": "text"}],
            "evalSplit": {"sources": []},
            "packing": True,
            "maxSeqLength": 64,
        },
    )
    stats = json.loads((out / "data-stats.json").read_text())["train"]
    # Documents are joined with EOS and cut into blocks: nothing of the corpus is truncated.
    assert stats["blocks"] >= 2 and stats["truncated"] == 0
    assert stats["tokens_trained"] >= 0.97 * stats["tokens_in"]
    assert metrics["data_blocks"] == stats["blocks"]
    assert metrics["steps"] == 4


def test_sft_with_packing_trains_on_packed_sequences(
    write_job: Callable[..., Path], tmp_path: Path
) -> None:
    metrics, out = _train(write_job, tmp_path, method={"type": "lora"}, dataset={"packing": True})
    stats = json.loads((out / "data-stats.json").read_text())["train"]
    # The demo's records (18-22 tokens): three fit in 62 of the 64 tokens.
    assert stats["packed_sequences"] == -(-stats["records"] // 3)
    assert stats["packed_longest"] <= 64
    assert stats["packing_efficiency"] > 0.95
    assert metrics["steps"] == 4
    # Throughput counts tokens, not the sum of the 4-D additive block mask (hugely negative).
    assert metrics["tokens_per_second"] is not None and metrics["tokens_per_second"] > 0
    assert json.loads((out / "progress.json").read_text())["tokensPerSecond"] > 0


@pytest.mark.parametrize("rope", ["linear", "dynamic", "yarn"])
def test_rope_scaling_extends_context(
    write_job: Callable[..., Path], tmp_path: Path, rope: str
) -> None:
    from transformers import AutoConfig

    _, out = _train(
        write_job,
        tmp_path,
        method={"type": "full"},
        training={"ropeScaling": {"type": rope, "factor": 2.0}},
    )
    config = AutoConfig.from_pretrained(out / "final")
    assert config.rope_parameters["rope_type"] == rope
    assert config.rope_parameters["factor"] == 2.0
    assert config.max_position_embeddings == 512  # 256 x 2


def test_missing_target_module_lists_the_real_ones(
    write_job: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(MethodError, match=r"qkv_proj not found.*q_proj.*v_proj"):
        _train(
            write_job, tmp_path, method={"type": "lora", "lora": {"targetModules": ["qkv_proj"]}}
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_qlora_without_gpu_is_a_clear_error(write_job: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(MethodError, match="needs a CUDA GPU"):
        _train(write_job, tmp_path, method={"type": "qlora", "quantization": {"bits": 4}})


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_on_gpu(write_job: Callable[..., Path], tmp_path: Path, bits: int) -> None:
    metrics, out = _train(
        write_job,
        tmp_path,
        method={"type": "qlora", "quantization": {"bits": bits}},
        distributed={"gpusPerNode": 1},
    )
    assert metrics["steps"] == 4 and (out / "final" / "adapter_config.json").exists()
