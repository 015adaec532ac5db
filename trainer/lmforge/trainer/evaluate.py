"""Task metrics on the evaluation split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lmforge.trainer.data import Example, encode_prompt


def normalize_answer(text: str) -> str:
    """Exact match ignores surrounding white space and inner runs of spaces."""
    return " ".join(text.split())


@torch.no_grad()
def exact_match_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    chat_template: str | None,
    max_new_tokens: int,
    max_samples: int,
) -> float:
    """Share of eval examples whose greedy answer equals the reference answer.

    The prompt is the conversation without its last assistant turn, rendered
    with the same chat template as in training plus the generation prompt.
    """
    scored = [e for e in examples if e.reference is not None and e.messages][:max_samples]
    if not scored:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop_ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        stop_ids.add(im_end)
    correct = 0
    for example in scored:
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        prompt = encode_prompt(example.messages[:last], tokenizer, chat_template)
        ids = torch.tensor([prompt], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(i for i in stop_ids if i is not None),
            pad_token_id=tokenizer.pad_token_id,
        )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        correct += normalize_answer(answer) == normalize_answer(example.reference or "")
    model.train(was_training)
    return correct / len(scored)


def perplexity(loss: float | None) -> float | None:
    if loss is None or math.isnan(loss):
        return None
    return math.exp(min(loss, 50.0))
