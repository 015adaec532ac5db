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
