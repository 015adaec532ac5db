"""The data pre-flight: what training would make of a job's data, without loading the model.

`lmforge validate --data JOB.yaml` prints it; the trainer runs the same `prepare_data` as its
first step, so a job whose data cannot train fails before any weights load.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lmforge.trainer.data.prepare import PreparedData, prepare_data
from lmforge.trainer.data.report import TRAINED_END, TRAINED_START, marked_text, percentiles_text
from lmforge.trainer.data.templates import resolve_chat_template

from lmforge.api.runconfig import RunConfig


class PreflightError(Exception):
    """The pre-flight cannot run (no tokenizer to measure the data with)."""


def preflight(config: RunConfig, samples: int = 3) -> str:
    """A readable report of the job's data as the trainer would prepare it.

    Raises DataError when the data is invalid or leaves nothing to train on, and
    PreflightError when the model's tokenizer cannot be loaded.
    """
    spec = config.spec
    tokenizer = _tokenizer(config.paths.model, spec.model.trust_remote_code)
    template = resolve_chat_template(spec.model.chat_template, tokenizer)
    with tempfile.TemporaryDirectory(prefix="lmforge-preflight-") as cache:
        data = prepare_data(
            spec.dataset,
            tokenizer,
            chat_template=template,
            continued_pretraining=spec.task == "continued-pretraining",
            base_dir=Path(config.paths.data or "."),
            seed=spec.training.seed,
            cache_dir=Path(cache),
        )
        return describe(data, tokenizer, spec.dataset.max_seq_length, samples)


def _tokenizer(model: str, trust_remote_code: bool) -> Any:
    """The tokenizer of a local model folder, or of hf://org/name[@revision] where reachable."""
    from lmforge.trainer.model import load_tokenizer

    name, _, revision = model.removeprefix("hf://").partition("@")
    try:
        if model.startswith("hf://"):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(
                name, revision=revision or None, trust_remote_code=trust_remote_code
            )
        if not Path(model).is_dir():
            raise PreflightError(
                f"spec.model: no model folder at {model}; the pre-flight needs the model's "
                "tokenizer (build or download the model first, or point model.source at it)"
            )
        return load_tokenizer(model, trust_remote_code)
    except (OSError, ValueError) as err:
        raise PreflightError(f"spec.model: cannot load the tokenizer of {model}: {err}") from err


def describe(data: PreparedData, tokenizer: Any, max_seq_length: int, samples: int) -> str:
    """Per-source counts, length percentiles, the summary, warnings and the first records."""
    train, evaluation = data.stats["train"], data.stats["eval"]
    lines = ["sources:"]
    for source in data.stats["sources"]:
        lines.append(
            f"  {source['uri']}: {source['examples']:,} valid records, weight "
            f"{source['weight']:g} -> {source['in_training']:,} in training"
            + (f", {source['held_out']:,} held out for evaluation" if source["held_out"] else "")
        )
    if evaluation:
        lines.append(f"  evaluation: {evaluation['examples']:,} records")
    unit = "document" if "blocks" in train else "record"
    lines.append(
        f"{unit} lengths before maxSeqLength {max_seq_length:,}: "
        + percentiles_text(train.get("length_percentiles", {}))
    )
    lines.append(data.summary)
    lines += [f"warning: {warning}" for warning in data.warnings]
    shown = min(samples, len(data.train))
    if shown:
        lines.append(
            f"first {shown} training records as the model sees them "
            f"({TRAINED_START}...{TRAINED_END} marks the tokens the loss is computed on):"
        )
    for i in range(shown):
        record = data.train[i]
        trained = sum(label != -100 for label in record["labels"])
        lines.append(
            f"--- record {i + 1}: {len(record['input_ids']):,} tokens, {trained:,} trained"
        )
        lines.append(marked_text(record["input_ids"], record["labels"], tokenizer))
    return "\n".join(lines)


# ---------------------------------------------------------------- AlignmentJobs
# Each method family reads its data as its recipe does (the same functions), so the
# counts here are the counts training will report.

PAIRED = ("preference", "kto", "reward")


def alignment_preflight(config: RunConfig, samples: int = 3) -> str:
    """What an AlignmentJob's recipe would make of its data, without loading the model.

    Raises DataError for invalid data (file, line, field) and PreflightError when the
    model's tokenizer cannot be loaded.
    """
    from lmforge.trainer.data.loading import load_examples
    from lmforge.trainer.recipes import METHOD_FAMILIES

    spec = config.spec
    method = spec.objective
    family = METHOD_FAMILIES[method]
    tokenizer = _tokenizer(config.paths.model, spec.model.trust_remote_code)
    template = resolve_chat_template(spec.model.chat_template, tokenizer)
    train, evaluation = load_examples(
        spec.dataset, Path(config.paths.data or "."), seed=spec.training.seed
    )
    max_length = spec.dataset.max_seq_length
    what = {
        "preference": "preference pairs (prompt, chosen, rejected)",
        "reward": "preference pairs scored by a reward head",
        "kto": "labelled completions (desirable or not)",
    }.get(family, "prompts (responses are generated while training)")
    lines = [
        f"method {method}: trains on {what}; {len(train):,} training records, "
        f"{len(evaluation):,} held out"
    ]
    if family in PAIRED:
        lines += _paired_report(family, method, train, tokenizer, template, max_length, samples)
    else:
        lines += _prompt_report(train, tokenizer, template, samples)
    return "\n".join(lines)


def _paired_report(
    family: str,
    method: str,
    examples: list[Any],
    tokenizer: Any,
    template: str | None,
    max_length: int,
    samples: int,
) -> list[str]:
    from lmforge.trainer import pairs
    from lmforge.trainer.data.tokenization import length_percentiles

    if family == "kto":
        from lmforge.trainer.recipes.kto import encode_rows

        rows = encode_rows(examples, tokenizer, template)
        answers = [[r["completion_ids"]] for r in rows]
        desirable = sum(bool(r["label"]) for r in rows)
        head = [f"{desirable:,} desirable and {len(rows) - desirable:,} undesirable completions"]
    else:
        rows = pairs.encode_pairs(examples, tokenizer, template, method)
        answers = [[r["chosen_ids"], r["rejected_ids"]] for r in rows]
        head = []
    prompts = [len(r["prompt_ids"]) for r in rows]
    longest = [max(len(a) for a in pair) for pair in answers]
    totals = [p + a for p, a in zip(prompts, longest, strict=True)]
    lines = [
        *head,
        f"prompt tokens: {percentiles_text(length_percentiles(prompts))}",
        f"answer tokens (the longer of each record's answers): "
        f"{percentiles_text(length_percentiles(longest))}",
    ]
    n = len(rows)
    if family == "reward":
        # A reward model scores whole texts: a pair with a side over the limit is left out.
        left_out = sum(total > max_length for total in totals)
        lines.append(f"{left_out:,} of {n:,} pairs longer than maxSeqLength {max_length:,}")
        if n and left_out / n > 0.01:
            lines.append(
                f"warning: {left_out:,} of {n:,} pairs are longer than maxSeqLength "
                f"{max_length:,} and are left out of training (the longest is "
                f"{max(totals):,} tokens); raise dataset.maxSeqLength"
            )
    else:
        dropped = sum(not pairs.fits(r, max_length) for r in rows)
        truncated = sum(total > max_length for total in totals) - dropped
        lines.append(
            f"{dropped:,} of {n:,} records dropped (prompt alone reaches maxSeqLength "
            f"{max_length:,}), {truncated:,} with answers cut at maxSeqLength"
        )
        pairs.fitting(rows, max_length)  # none left: bad data, as in training
        if n and dropped / n > 0.01:
            lines.append(
                f"warning: {dropped:,} of {n:,} records have no answer token within "
                f"maxSeqLength {max_length:,}; the longest prompt is {max(prompts):,} tokens; "
                "raise dataset.maxSeqLength"
            )
        if n and truncated / n > 0.05:
            lines.append(
                f"warning: {truncated:,} of {n:,} records have answers cut at maxSeqLength "
                f"{max_length:,} (the longest record is {max(totals):,} tokens); raise "
                "dataset.maxSeqLength"
            )
    shown = min(samples, n)
    if shown:
        lines.append(f"first {shown} training records as the model sees them:")
    names = ["completion"] if family == "kto" else ["chosen", "rejected"]
    for i in range(shown):
        label = ""
        if family == "kto":
            label = " (desirable)" if rows[i]["label"] else " (undesirable)"
        lines.append(f"--- record {i + 1}{label}: prompt {prompts[i]:,} tokens")
        lines.append(tokenizer.decode(rows[i]["prompt_ids"], skip_special_tokens=False))
        for name, ids in zip(names, answers[i], strict=True):
            lines.append(f"--- {name}: {len(ids):,} tokens")
            lines.append(tokenizer.decode(ids, skip_special_tokens=False))
    return lines


def _prompt_report(
    examples: list[Any], tokenizer: Any, template: str | None, samples: int
) -> list[str]:
    from lmforge.trainer.data.tokenization import encode_prompt, length_percentiles

    prompts = [encode_prompt(e.messages, tokenizer, template) for e in examples]
    lines = [f"prompt tokens: {percentiles_text(length_percentiles([len(p) for p in prompts]))}"]
    shown = min(samples, len(prompts))
    if shown:
        lines.append(f"first {shown} prompts as the policy sees them:")
    for i in range(shown):
        columns = ", ".join(sorted(examples[i].columns)) or "none"
        lines.append(f"--- prompt {i + 1}: {len(prompts[i]):,} tokens (other fields: {columns})")
        lines.append(tokenizer.decode(prompts[i], skip_special_tokens=False))
    return lines
