"""Say what preparation did to the data: one summary line, warnings with cause and fix, previews.

Pure functions of the statistics that `prepare_data` computes, so that the trainer's log,
`data-stats.json`, the job's metrics and `lmforge validate --data` all tell the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lmforge.trainer.data.tokenization import IGNORE

# Warn when more than this share of records is dropped / truncated.
DROP_WARNING = 0.01
TRUNCATION_WARNING = 0.05
# Marks around the tokens the loss is computed on, in previews.
TRAINED_START, TRAINED_END = "[[", "]]"


def summary_line(stats: Mapping[str, Any], max_seq_length: int) -> str:
    """One line on what was trained: records, tokens, drops and truncation (train split)."""
    if "blocks" in stats:
        return (
            f"continued pretraining: {stats['documents']:,} documents, "
            f"{stats['tokens_in']:,} tokens -> {stats['blocks']:,} blocks of "
            f"{max_seq_length:,} tokens, {stats['tokens_trained']:,} tokens trained "
            f"({100 * stats['trained_fraction']:.2f}%); last partial block "
            f"{stats['partial_block']}"
        )
    line = (
        f"{stats['examples']:,} training examples -> {stats['records']:,} records, "
        f"{stats['tokens']:,} tokens ({stats['trainable_tokens']:,} trained); "
        f"{stats['dropped']:,} dropped, {stats['truncated']:,} truncated at maxSeqLength "
        f"{max_seq_length:,}"
    )
    if "packed_sequences" in stats:
        line += (
            f"; packed into {stats['packed_sequences']:,} sequences of at most "
            f"{stats['packed_longest']:,} tokens ({100 * stats['packing_efficiency']:.1f}% real "
            "tokens, padded to the longest)"
        )
    return line


def warnings(stats: Mapping[str, Any], max_seq_length: int, split: str = "training") -> list[str]:
    """A warning, with count, cause and fix, for each thing that went wrong with many records."""
    found: list[str] = []
    if stats.get("blocks") == 0 and stats.get("partial_block") == "dropped":
        found.append(
            f"the {split} corpus ({stats['tokens_in']:,} tokens) is shorter than one block of "
            f"maxSeqLength {max_seq_length:,} and dataset.keepPartialBlock is false; keep the "
            "partial block or lower dataset.maxSeqLength"
        )
    examples = stats.get("examples", 0)
    if not examples:
        return found
    dropped, truncated = stats.get("dropped", 0), stats.get("truncated", 0)
    if dropped / examples > DROP_WARNING:
        longest = stats.get("longest_dropped_prompt", 0)
        if longest >= max_seq_length:
            found.append(
                f"{dropped:,} of {examples:,} {split} records have no assistant tokens within "
                f"maxSeqLength {max_seq_length:,}; the longest prompt is {longest:,} tokens; "
                "raise dataset.maxSeqLength"
            )
        else:
            found.append(
                f"{dropped:,} of {examples:,} {split} records have no trained tokens (no "
                "assistant answer to learn from); check the records' last turns, or set "
                "dataset.trainOnPrompt"
            )
    if truncated / examples > TRUNCATION_WARNING:
        lengths = stats.get("length_percentiles", {})
        found.append(
            f"{truncated:,} of {examples:,} {split} records are longer than maxSeqLength "
            f"{max_seq_length:,} and were truncated (p90 {lengths.get('p90', 0):,}, longest "
            f"{lengths.get('max', 0):,} tokens); raise dataset.maxSeqLength, or use task: "
            "continued-pretraining for plain text, which cuts blocks instead of truncating"
        )
    return found


def data_metrics(stats: Mapping[str, Any]) -> dict[str, float]:
    """The training split's numbers as flat metrics (metrics.json and the job's status)."""
    keys = {
        "examples": "data_examples",
        "records": "data_records",
        "dropped": "data_dropped",
        "truncated": "data_truncated",
        "tokens": "data_tokens",
        "trainable_tokens": "data_trained_tokens",
        "documents": "data_documents",
        "tokens_in": "data_tokens_in",
        "blocks": "data_blocks",
    }
    return {name: float(stats[key]) for key, name in keys.items() if key in stats}


def marked_text(ids: Sequence[int], labels: Sequence[int], tokenizer: Any) -> str:
    """A record decoded with the tokens the loss is computed on between [[ and ]]."""
    pieces: list[str] = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(list(ids[start:end]), skip_special_tokens=False)
            trained = labels[start] != IGNORE
            pieces.append(f"{TRAINED_START}{text}{TRAINED_END}" if trained else text)
            start = end
    return "".join(pieces)


def percentiles_text(lengths: Mapping[str, int]) -> str:
    """p50 12 / p90 40 / p99 80 / max 120 tokens."""
    if not lengths:
        return "no records"
    return " / ".join(f"{name} {value:,}" for name, value in lengths.items()) + " tokens"
