"""Preference pairs as token ids, rendered exactly as the SFT recipe renders conversations, and
the held-out preference accuracy the DPO family and KTO are judged on.

Every preference trainer (TRL's DPO, KTO, CPO/SimPO, ORPO) gets the same token ids from
`encode_pairs`: the prompt up to the generation prompt, then each answer with the end-of-turn
marker and EOS, so an aligned model is trained on exactly the text it saw in SFT and is
prompted with at inference (`data.encode_prompt`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lmforge.trainer.data import DataError, DataProblem, Example
from lmforge.trainer.data.tokenization import render_conversation
from lmforge.trainer.model import Precision
from lmforge.trainer.sharding import on_every_rank

Record = dict[str, list[int]]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _encode(
    text: str, tokenizer: Any, chat_template: str | None, *, eos: bool = False
) -> list[int]:
    # Named templates write their own special tokens; plain "role: content" lines rely on the
    # tokenizer's (the SFT recipe's rule).
    ids = list(tokenizer(text, add_special_tokens=chat_template is None)["input_ids"])
    if (
        eos
        and tokenizer.eos_token_id is not None
        and (not ids or ids[-1] != tokenizer.eos_token_id)
    ):
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_answers(
    prompt: Sequence[Mapping[str, str]],
    answers: Sequence[Sequence[Mapping[str, str]]],
    tokenizer: Any,
    chat_template: str | None,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt (with the generation prompt) and of each answer after it.

    Each answer is the prompt + answer conversation as SFT tokenizes it (trailing whitespace
    stripped, EOS appended) minus the prompt; where a template renders the prompt alone
    differently, the prompt ends where all renderings agree.
    """
    prompt_text = render_conversation(
        list(prompt), tokenizer, chat_template, generation_prompt=True, tools=tools
    )
    prompt_ids = _encode(prompt_text, tokenizer, chat_template)
    full = []
    for answer in answers:
        text = render_conversation(
            [*prompt, *answer], tokenizer, chat_template, generation_prompt=False, tools=tools
        ).rstrip()
        full.append(_encode(text, tokenizer, chat_template, eos=True))
    shared = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return prompt_ids[:shared], [ids[shared:] for ids in full]


def encode_pairs(
    examples: Sequence[Example], tokenizer: Any, chat_template: str | None, method: str
) -> list[Record]:
    """`{"prompt_ids", "chosen_ids", "rejected_ids"}` per preference example; examples without
    a rejected answer (or a template that refuses them) are reported as bad data."""
    problems: list[DataProblem] = []
    records: list[Record] = []
    for example in examples:
        where = example.origin or "<example>"
        if not example.chosen or not example.rejected:
            problems.append(
                DataProblem(
                    where,
                    "",
                    "rejected",
                    f"{method} trains on preference pairs (prompt, chosen, rejected); this record "
                    "has no chosen/rejected pair",
                )
            )
            continue
        try:
            prompt_ids, (chosen, rejected) = encode_answers(
                example.messages,
                [example.chosen, example.rejected],
                tokenizer,
                chat_template,
                [dict(t) for t in example.tools] or None,
            )
        except Exception as err:  # a template may refuse a conversation (raise_exception)
            problems.append(DataProblem(where, "", "messages", f"chat template: {err}"))
            continue
        records.append({"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected})
    if problems:
        raise DataError(problems)
    return records


def fits(record: Record, max_length: int) -> bool:
    """Whether any answer token survives truncation to max_length (keep the start)."""
    return len(record["prompt_ids"]) < max_length


def fitting(records: list[Record], max_length: int) -> list[Record]:
    """The records with an answer token within max_length; bad data when none has one."""
    kept = [r for r in records if fits(r, max_length)]
    if records and not kept:
        longest = max(len(r["prompt_ids"]) for r in records)
        raise DataError(
            [
                DataProblem(
                    "dataset",
                    "",
                    "maxSeqLength",
                    f"no record has an answer token within maxSeqLength {max_length:,} "
                    f"(the longest prompt is {longest:,} tokens); raise it",
                )
            ]
        )
    return kept


# ---------------------------------------------------------------- scoring


@dataclass
class SequenceLogps:
    """Summed log-probabilities of each answer of each pair, and its token count."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)


@torch.no_grad()
def answer_logps(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    max_length: int,
    precision: Precision | None = None,
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each answer after its prompt, and the answer's token count
    (sequences truncated to max_length, keeping the start, as the trainers do), computed
    where the model is and as the run's `precision` computes (its autocast)."""
    if not prompts:
        return torch.zeros(0), torch.zeros(0)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    computing = precision.autocast(device) if precision is not None else contextlib.nullcontext()
    sums, counts = [], []
    for start in range(0, len(prompts), batch_size):
        rows = [
            (list(p) + list(a))[:max_length]
            for p, a in zip(
                prompts[start : start + batch_size],
                answers[start : start + batch_size],
                strict=True,
            )
        ]
        masks = [
            ([0] * len(p) + [1] * len(a))[:max_length]
            for p, a in zip(
                prompts[start : start + batch_size],
                answers[start : start + batch_size],
                strict=True,
            )
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], device=device)
        attention = torch.tensor(
            [[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device
        )
        answer_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
        with computing:
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        logits = logits.float()
        logps = torch.gather(F.log_softmax(logits[:, :-1], dim=-1), 2, ids[:, 1:, None]).squeeze(2)
        mask = answer_mask[:, 1:].float()
        sums.append((logps * mask).sum(dim=1).cpu())
        counts.append(mask.sum(dim=1).cpu())
    model.train(was_training)
    return torch.cat(sums), torch.cat(counts)


def pair_logps(
    model: torch.nn.Module,
    records: Sequence[Record],
    *,
    pad_token_id: int,
    max_length: int,
    precision: Precision | None = None,
) -> SequenceLogps:
    """Log-probabilities of the chosen and the rejected answer of every pair under `model`.

    Every rank of a run must call it with the same records (`sharding.on_every_rank`: each
    scores its share, and a sharded model's forward needs every rank); all get every score.
    """

    def score(share: list[Record]) -> list[tuple[float, float, float, float]]:
        prompts = [r["prompt_ids"] for r in share]
        scored = [
            answer_logps(
                model,
                prompts,
                [r[answer] for r in share],
                pad_token_id=pad_token_id,
                max_length=max_length,
                precision=precision,
            )
            for answer in ("chosen_ids", "rejected_ids")
        ]
        (chosen, chosen_n), (rejected, rejected_n) = scored
        rows = torch.stack([chosen, rejected, chosen_n, rejected_n], dim=1)
        return [tuple(row) for row in rows.tolist()]

    columns = torch.tensor(on_every_rank(score, records), dtype=torch.float32).reshape(-1, 4)
    return SequenceLogps(*columns.unbind(dim=1))


def reference_margins(policy: SequenceLogps, reference: SequenceLogps) -> torch.Tensor:
    """DPO's implicit reward margin per pair (over beta): how much more the policy raised the
    chosen answer's log-probability over the reference than the rejected one's."""
    return (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)


def normalised_margins(policy: SequenceLogps) -> torch.Tensor:
    """SimPO's and ORPO's own reward margin per pair (over beta): the length-normalised
    log-probability of the chosen answer minus that of the rejected one."""
    return policy.chosen_mean - policy.rejected_mean


def accuracy(margins: torch.Tensor) -> float | None:
    """Fraction of pairs with a positive margin (ties count as wrong)."""
    return float((margins > 0).float().mean()) if margins.numel() else None
