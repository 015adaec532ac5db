"""The varlen attention (trainer/attention.py): padding-free packed rows through one kernel
call, records kept apart. On CPU the records go through SDPA one at a time, the same result
the CUDA kernel gives; the kernel itself runs in the `gpu` test."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmforge.trainer.attention import (  # noqa: E402
    VARLEN,
    attention_for,
    padding_free,
    varlen_attention_forward,
)
from lmforge.trainer.data import Example, tokenize_examples  # noqa: E402
from lmforge.trainer.data.collate import DataCollator  # noqa: E402
from lmforge.trainer.tiny import build_tokenizer, bundled_texts  # noqa: E402

RECORD_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer(bundled_texts(), vocab_size=300)


def _model(tokenizer: Any, attn_implementation: str, **config: Any) -> Any:
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as the Llamas have
        max_position_embeddings=256,
        attn_implementation=attn_implementation,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    return transformers.LlamaForCausalLM(llama).eval()


def _packed(tokenizer: Any) -> list[dict[str, Any]]:
    sentences = [s for text in bundled_texts() for s in text.split(". ") if s.strip()][:12]
    records = tokenize_examples(
        [Example(text=s) for s in sentences],
        tokenizer,
        chat_template=None,
        max_seq_length=64,
        train_on_prompt=True,
        packing=True,
    ).records
    assert any(sum(p == 0 for p in r["position_ids"]) > 1 for r in records)  # packed
    return records


def _loss_and_grads(model: Any, batch: dict[str, Any]) -> tuple[Any, list[Any]]:
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_varlen_trains_packed_rows_exactly_as_the_block_mask(tokenizer: Any) -> None:
    """One joined row, no mask: loss and gradients equal the dense block mask's under SDPA,
    whether the records' bounds come from the collator or from the position ids."""
    packed = _packed(tokenizer)
    dense_loss, dense_grads = _loss_and_grads(
        _model(tokenizer, "sdpa"), DataCollator(tokenizer)(packed)
    )
    model = _model(tokenizer, VARLEN)
    assert padding_free(model) is True
    flat = DataCollator(tokenizer, padding_free=True, pad_to_multiple_of=8)(packed)
    starts = [i for i, p in enumerate(flat["position_ids"][0].tolist()) if p == 0]
    bounds = [*starts, flat["input_ids"].shape[1]]
    assert flat["cu_seq_lens_q"].tolist() == bounds
    assert flat["max_length_q"] == max(b - a for a, b in itertools.pairwise(bounds))
    found = {k: v for k, v in flat.items() if k not in RECORD_KWARGS}
    for batch in (flat, found):
        loss, grads = _loss_and_grads(model, batch)
        torch.testing.assert_close(loss, dense_loss, atol=1e-5, rtol=1e-5)
        for grad, dense_grad in zip(grads, dense_grads, strict=True):
            torch.testing.assert_close(grad, dense_grad, atol=1e-5, rtol=1e-4)
    # Neither bounds nor position ids: one sequence, the records see each other.
    mixed = {k: v for k, v in found.items() if k != "position_ids"}
    assert not torch.allclose(model(**mixed).loss, dense_loss, atol=1e-3)


def test_with_a_mask_or_a_cache_it_is_sdpa(tokenizer: Any) -> None:
    """Padding (a 2-D mask) and decoding with a cache take SDPA's path: the same logits and
    the same greedy tokens as transformers' sdpa implementation."""
    sdpa, varlen = _model(tokenizer, "sdpa"), _model(tokenizer, VARLEN)
    texts = ["The river flows", "A much longer line of text than the first one"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all()
    with torch.no_grad():
        torch.testing.assert_close(varlen(**batch).logits, sdpa(**batch).logits)
    tokenizer.padding_side = "left"
    try:
        prompts = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    generate = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    assert torch.equal(varlen.generate(**prompts, **generate), sdpa.generate(**prompts, **generate))


def test_chosen_only_on_cuda_in_half_precision_for_the_attention_it_covers(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tokenizer, "sdpa")
    assert attention_for(model, torch.bfloat16) is None  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention_for(model, torch.bfloat16) == VARLEN
    assert attention_for(model, torch.float16) == VARLEN
    assert attention_for(model, torch.float32) is None  # the kernels take half precision
    assert attention_for(_model(tokenizer, "sdpa", attention_dropout=0.1), torch.bfloat16) is None
    mistral = transformers.MistralForCausalLM(
        transformers.MistralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
        )
    )  # fmt: skip
    assert attention_for(mistral, torch.bfloat16) is None
    mistral.config.sliding_window = None
    assert attention_for(mistral, torch.bfloat16) == VARLEN


def test_load_model_sets_it_for_a_half_precision_cuda_run(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmforge.trainer.model import Precision, load_model

    from lmforge.api.common import TrainingSpec, TuningMethod

    def load(precision: str) -> Any:
        return load_model(
            str(tiny_model),
            method=TuningMethod(),
            training=TrainingSpec(),
            precision=Precision(precision),
        )

    assert load("bf16").config._attn_implementation != VARLEN  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = load("bf16")
    assert model.config._attn_implementation == VARLEN and padding_free(model)
    assert load("fp32").config._attn_implementation != VARLEN


def test_what_it_does_not_run_is_refused_not_ignored(tokenizer: Any) -> None:
    layer = _model(tokenizer, VARLEN).model.layers[0].self_attn
    q = torch.zeros(1, 4, 5, 8)
    kv = torch.zeros(1, 2, 5, 8)
    with pytest.raises(NotImplementedError, match="sliding_window"):
        varlen_attention_forward(layer, q, kv, kv, None, sliding_window=4)
    with pytest.raises(NotImplementedError, match="non-causal"):
        varlen_attention_forward(layer, q, kv, kv, None, is_causal=False)


@pytest.mark.gpu
def test_the_cuda_kernel_matches_the_block_mask(tokenizer: Any) -> None:
    """bf16 autocast on CUDA, as a bf16 run trains: the varlen kernel's loss and gradients
    against SDPA's with the dense block mask."""
    packed = _packed(tokenizer)
    dense = {k: v.cuda() for k, v in DataCollator(tokenizer)(packed).items()}
    flat = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v
        for k, v in DataCollator(tokenizer, padding_free=True)(packed).items()
    }
    results = []
    for implementation, batch in (("sdpa", dense), (VARLEN, flat)):
        model = _model(tokenizer, implementation).cuda().train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(_loss_and_grads(model, batch))
    (dense_loss, dense_grads), (loss, grads) = results
    torch.testing.assert_close(loss, dense_loss, atol=2e-2, rtol=2e-2)
    for grad, dense_grad in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(grad, dense_grad, atol=5e-2, rtol=5e-2)
