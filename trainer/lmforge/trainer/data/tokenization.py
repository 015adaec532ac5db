"""Turn examples into token ids and loss labels (-100 = not trained), optionally packed."""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmforge.trainer.data.examples import DataError, DataProblem, Example
from lmforge.trainer.data.packing import PackingCount, pack_records
from lmforge.trainer.data.templates import PLAIN_TEMPLATE

IGNORE = -100  # label of tokens the loss skips (PyTorch cross-entropy's ignore_index)


@dataclass
class TokenizedData:
    """Token records ready for a data collator, and what tokenization did to the data.

    Unpacked records have input_ids, labels and attention_mask; packed ones have input_ids,
    labels and position_ids (restarting at 0 where each original record starts).
    """

    records: list[dict[str, list[int]]]
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Encoded:
    """One example as tokens, and what fitting it into max_seq_length did to it."""

    ids: list[int]
    labels: list[int]
    length: int  # tokens before truncation
    prompt_tokens: int  # tokens before the first trained one (before truncation)
    truncated: bool

    @property
    def dropped(self) -> bool:
        """No trained token is left: the record would only add a 0/0 loss."""
        return all(label == IGNORE for label in self.labels)


def encode_example(
    example: Example,
    tokenizer: Any,
    *,
    chat_template: str | None,
    max_seq_length: int | None,
    train_on_prompt: bool,
    problems: list[DataProblem],
) -> Encoded | None:
    """Token ids and labels of one example, truncated to max_seq_length (None: never).

    None (with a problem appended) when the chat template refuses the conversation.
    """
    if example.text is not None:
        ids, labels = _encode_text(example.text, tokenizer)
    else:
        pair = _encode_chat(example, tokenizer, chat_template, train_on_prompt, problems)
        if pair is None:
            return None
        ids, labels = pair
    # Nothing predicts a record's first token; leaving it unlabelled also keeps a packed
    # record from being trained to predict the start of the next one.
    labels[0] = IGNORE
    length = len(ids)
    prompt_tokens = next((t for t, label in enumerate(labels) if label != IGNORE), length)
    truncated = max_seq_length is not None and length > max_seq_length
    if truncated:
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    return Encoded(ids, labels, length, prompt_tokens, truncated)


class TokenStats:
    """Counts what tokenization did, one record at a time (no record is kept)."""

    def __init__(self) -> None:
        self.examples = 0
        self.records = 0
        self.dropped = 0
        self.truncated = 0
        self.tokens = 0
        self.trainable_tokens = 0
        self.max_length = 0
        self.longest_dropped_prompt = 0
        self.lengths = array("I")  # untruncated lengths, for percentiles

    def add(self, encoded: Encoded) -> None:
        self.examples += 1
        self.lengths.append(encoded.length)
        self.truncated += encoded.truncated
        if encoded.dropped:
            self.dropped += 1
            self.longest_dropped_prompt = max(self.longest_dropped_prompt, encoded.prompt_tokens)
            return
        self.records += 1
        self.tokens += len(encoded.ids)
        self.trainable_tokens += sum(label != IGNORE for label in encoded.labels)
        self.max_length = max(self.max_length, len(encoded.ids))

    def as_dict(self) -> dict[str, Any]:
        return chat_stats(
            examples=self.examples,
            records=self.records,
            dropped=self.dropped,
            truncated=self.truncated,
            tokens=self.tokens,
            trainable_tokens=self.trainable_tokens,
            max_length=self.max_length,
            longest_dropped_prompt=self.longest_dropped_prompt,
            percentiles=length_percentiles(self.lengths),
        )


def chat_stats(
    *,
    examples: int,
    records: int,
    dropped: int,
    truncated: int,
    tokens: int,
    trainable_tokens: int,
    max_length: int,
    longest_dropped_prompt: int,
    percentiles: dict[str, int],
) -> dict[str, Any]:
    """What tokenization did to chat/instruction records (data-stats.json's keys)."""
    return {
        "examples": examples,
        "records": records,
        "dropped": dropped,
        "dropped_fraction": dropped / examples if examples else 0.0,
        "longest_dropped_prompt": longest_dropped_prompt,
        "tokens": tokens,
        "trainable_tokens": trainable_tokens,
        "truncated": truncated,
        "truncated_fraction": truncated / examples if examples else 0.0,
        "max_length": max_length,
        "mean_length": tokens / records if records else 0.0,
        "length_percentiles": percentiles,
    }


def block_stats(
    *,
    documents: int,
    tokens_in: int,
    blocks: int,
    tokens: int,
    tokens_trained: int,
    partial_block: str,
    percentiles: dict[str, int],
) -> dict[str, Any]:
    """What continued pretraining kept of the corpus (chat keys too, where they agree)."""
    return {
        "documents": documents,
        "tokens_in": tokens_in,
        "blocks": blocks,
        "partial_block": partial_block,  # "kept", "dropped", or "none" (no short last block)
        "tokens": tokens,
        "tokens_trained": tokens_trained,
        "trained_fraction": tokens_trained / tokens_in if tokens_in else 0.0,
        "examples": documents,
        "records": blocks,
        "trainable_tokens": tokens_trained,
        "dropped": 0,
        "truncated": 0,
        "length_percentiles": percentiles,
    }


def length_percentiles(lengths: Sequence[int]) -> dict[str, int]:
    """p50/p90/p99/max of token lengths (nearest rank); empty when there are none."""
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def rank(q: float) -> int:
        return int(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": int(ordered[-1])}


def tokenize_examples(
    examples: Iterable[Example],
    tokenizer: Any,
    *,
    chat_template: str | None,
    max_seq_length: int,
    train_on_prompt: bool,
    packing: bool,
) -> TokenizedData:
    """Tokenize examples for causal-LM training.

    Text examples train on every token; conversations (`messages`, then `chosen` for preference
    data) are rendered with `chat_template` (None: plain "role: content" lines) and train only on
    the assistant turns unless `train_on_prompt`. EOS is appended when the rendering does not end
    with it, records are truncated to `max_seq_length`, and records left without any trained
    token are dropped (counted in stats["dropped"]) because they would only add a 0/0 loss.
    """
    problems: list[DataProblem] = []
    encoded: list[tuple[list[int], list[int]]] = []
    counts = TokenStats()
    for example in examples:
        record = encode_example(
            example,
            tokenizer,
            chat_template=chat_template,
            max_seq_length=max_seq_length,
            train_on_prompt=train_on_prompt,
            problems=problems,
        )
        if record is None:
            continue
        counts.add(record)
        if not record.dropped:
            encoded.append((record.ids, record.labels))
    if problems:
        raise DataError(problems)

    stats: dict[str, Any] = counts.as_dict()
    if packing:
        count = PackingCount()
        records = list(pack_records(encoded, max_seq_length, count))
        stats.update(count.as_dict())
    else:
        records = [
            {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}
            for ids, labels in encoded
        ]
    return TokenizedData(records=records, stats=stats)


def cut_blocks(documents: Iterable[list[int]], size: int) -> Iterator[list[int]]:
    """Concatenate token lists and yield blocks of `size` (the last one may be shorter)."""
    buffer: list[int] = []
    for ids in documents:
        buffer += ids
        full = len(buffer) - len(buffer) % size
        for start in range(0, full, size):
            yield buffer[start : start + size]
        buffer = buffer[full:]
    if buffer:
        yield buffer


def _encode_text(text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    # verbose=False: a document longer than the model's context is expected here (it is cut
    # into blocks or truncated later, and counted); the tokenizer's warning would only alarm.
    ids = list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
    ids = _with_eos(ids, tokenizer)
    return ids, list(ids)


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    """Append EOS so the model learns to stop (unless the text already ends with it)."""
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        return [*ids, eos]
    return ids


def render_conversation(
    messages: Sequence[Mapping[str, str]],
    tokenizer: Any,
    chat_template: str | None,
    *,
    generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """A conversation as text, exactly as training renders it (None: plain concatenation)."""
    template = chat_template if chat_template is not None else PLAIN_TEMPLATE
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        tools=tools,
        chat_template=template,
        add_generation_prompt=generation_prompt,
        tokenize=False,
    )
    return str(text)


def _adds_special_tokens(chat_template: str | None) -> bool:
    # Named templates write bos_token themselves; plain concatenation relies on the tokenizer.
    return chat_template is None


def encode_prompt(
    messages: Sequence[Mapping[str, str]], tokenizer: Any, chat_template: str | None
) -> list[int]:
    """Token ids of a conversation up to the generation prompt, as the model saw it in training."""
    text = render_conversation(messages, tokenizer, chat_template, generation_prompt=True)
    return list(
        tokenizer(text, add_special_tokens=_adds_special_tokens(chat_template))["input_ids"]
    )


def _encode_chat(
    example: Example,
    tokenizer: Any,
    chat_template: str | None,
    train_on_prompt: bool,
    problems: list[DataProblem],
) -> tuple[list[int], list[int]] | None:
    messages = [dict(message) for message in example.messages + example.chosen]
    tools = [dict(tool) for tool in example.tools] or None

    def render(conversation: list[dict[str, str]], generation_prompt: bool) -> str:
        return render_conversation(
            conversation,
            tokenizer,
            chat_template,
            generation_prompt=generation_prompt,
            tools=tools,
        )

    try:
        full = render(messages, False)
        spans = _assistant_spans(messages, full, render)
    except Exception as err:  # a template may refuse a conversation (raise_exception in Jinja)
        problems.append(
            DataProblem(example.origin or "<example>", "", "messages", f"chat template: {err}")
        )
        return None
    # Trailing whitespace after the last turn would only be an untrained token before EOS.
    text = full.rstrip()
    encoding = tokenizer(
        text,
        add_special_tokens=_adds_special_tokens(chat_template),
        return_offsets_mapping=True,
        verbose=False,
    )
    ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    labels = list(ids) if train_on_prompt else _label_spans(ids, offsets, spans)
    with_eos = _with_eos(ids, tokenizer)
    if len(with_eos) > len(ids):
        ends_with_answer = messages[-1]["role"] == "assistant"
        labels.append(with_eos[-1] if train_on_prompt or ends_with_answer else IGNORE)
    return with_eos, labels


def _assistant_spans(
    messages: list[dict[str, str]], full: str, render: Any
) -> list[tuple[int, int]]:
    """Character spans of the assistant turns (content + end-of-turn marker) in `full`.

    A turn's span is what rendering messages[:i+1] adds to messages[:i] rendered with the
    generation prompt, so it covers exactly what the model must generate after that prompt.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        after = full if i == len(messages) - 1 else render(messages[: i + 1], False)
        before = render(messages[:i], True) if i > 0 else ""
        if i > 0 and after.startswith(before) and full.startswith(after):
            start, end = len(before), len(after)
        else:
            # Templates that rewrite earlier turns: find the content itself.
            start = full.find(message["content"], cursor)
            if start < 0:
                continue
            end = start + len(message["content"])
        while start < end and full[start].isspace():
            start += 1
        while end > start and full[end - 1].isspace():
            end -= 1
        spans.append((start, end))
        cursor = end
    return spans


def _label_spans(
    ids: list[int], offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """Labels = ids where a token overlaps an assistant span, IGNORE elsewhere."""
    labels = [IGNORE] * len(ids)
    span = 0
    for t, (start, end) in enumerate(offsets):
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        if span == len(spans):
            break
        if end > start and start < spans[span][1] and end > spans[span][0]:
            labels[t] = ids[t]
    return labels
