"""The KTO recipe (AlignmentJob kto): unpaired desirable / undesirable answers.

load tokenizer -> load rows (KTO prompt/completion/label, or preference pairs split into a
desirable and an undesirable row) -> encode them as SFT renders conversations -> load model
(and the reference) -> set up TRL's KTOTrainer -> score the held-out pairs -> train (resuming)
-> score again -> export final/, metrics.json, model card (every rank takes part: see
preference)

`preference_accuracy` is measured on held-out preference pairs (e.g. tiny-preferences-eval):
the share where the policy raised the chosen answer's log-probability over the reference more
than the rejected one's (KTO's implicit reward, as for DPO).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

from datasets import Dataset
from lmforge.trainer import export, pairs
from lmforge.trainer.data import (
    DataError,
    DataProblem,
    Example,
    load_examples,
    resolve_chat_template,
)
from lmforge.trainer.launch import rank
from lmforge.trainer.loop import (
    AdaLoraCallback,
    ProgressCallback,
    TimedCheckpointCallback,
    final_eval_loss,
    run_metrics,
    train_resuming,
    training_kwargs,
    with_atomic_checkpoints,
)
from lmforge.trainer.model import (
    load_reference,
    load_tokenizer,
    parameter_counts,
    peft_config,
    resolve_precision,
    train_in_fp32,
)
from lmforge.trainer.progress import ProgressReporter
from lmforge.trainer.recipes import preference, sft
from transformers import set_seed

from lmforge.api.kinds import AlignmentJobSpec
from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)

Row = dict[str, Any]  # prompt_ids, completion_ids, label (+ KL_completion_ids)


def labelled(example: Example) -> list[tuple[Example, bool]]:
    """KTO's unpaired view of an example: a KTO row as it is, a pair as a desirable (chosen)
    and an undesirable (rejected) row."""
    if example.label is not None:
        return [(example, example.label)]
    answers = ((example.chosen, True), (example.rejected, False))
    return [
        (
            Example(
                messages=example.messages, tools=example.tools, chosen=answer, origin=example.origin
            ),
            good,
        )
        for answer, good in answers
        if answer
    ]


def encode_rows(examples: list[Example], tokenizer: Any, chat_template: str | None) -> list[Row]:
    """`{"prompt_ids", "completion_ids", "label"}` per labelled answer."""
    problems: list[DataProblem] = []
    rows: list[Row] = []
    for example in examples:
        views = labelled(example)
        if not views:
            problems.append(
                DataProblem(
                    example.origin or "<example>",
                    "",
                    "completion",
                    "kto trains on labelled answers (prompt, completion, label) or preference "
                    "pairs; this record has neither",
                )
            )
        for view, label in views:
            try:
                prompt_ids, (completion,) = pairs.encode_answers(
                    view.messages,
                    [view.chosen],
                    tokenizer,
                    chat_template,
                    [dict(t) for t in view.tools] or None,
                )
            except Exception as err:  # a template may refuse a conversation
                problems.append(
                    DataProblem(view.origin or "<example>", "", "messages", f"chat template: {err}")
                )
                continue
            rows.append({"prompt_ids": prompt_ids, "completion_ids": completion, "label": label})
    if problems:
        raise DataError(problems)
    return rows


def with_kl_completions(rows: list[Row], batch_size: int) -> list[Row]:
    """KTO's KL estimate pairs each prompt with another row's completion: rotated by one within
    each batch, as TRL does (its sampler keeps the order)."""
    out: list[Row] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        completions = [r["completion_ids"] for r in batch]
        rotated = completions[-1:] + completions[:-1]
        out += [r | {"KL_completion_ids": kl} for r, kl in zip(batch, rotated, strict=True)]
    return out


def run(config: RunConfig) -> dict[str, Any]:
    """Train, score and export one kto run; returns its metrics."""
    from trl import KTOConfig, KTOTrainer

    started = time.monotonic()
    spec = config.spec
    assert isinstance(spec, AlignmentJobSpec)
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    main = rank() == 0
    set_seed(spec.training.seed)

    tokenizer = load_tokenizer(config.paths.model, spec.model.trust_remote_code)
    template = resolve_chat_template(spec.model.chat_template, tokenizer)
    train_examples, eval_examples = load_examples(
        spec.dataset, Path(config.paths.data or "."), seed=spec.training.seed
    )
    max_length = spec.dataset.max_seq_length
    batch = spec.training.batch_size.per_device
    train_rows = pairs.fitting(encode_rows(train_examples, tokenizer, template), max_length)
    # Paired data gives adjacent chosen/rejected rows: shuffle so batches mix prompts.
    random.Random(f"kto/{spec.training.seed}").shuffle(train_rows)
    train_rows = with_kl_completions(train_rows, batch)
    eval_rows = with_kl_completions(
        [r for r in encode_rows(eval_examples, tokenizer, template) if pairs.fits(r, max_length)],
        batch,
    )
    eval_pairs = pairs.encode_pairs(
        [e for e in eval_examples if e.chosen and e.rejected], tokenizer, template, "kto"
    )
    eval_pairs = [r for r in eval_pairs if pairs.fits(r, max_length)]
    desirable = sum(r["label"] for r in train_rows)
    if main:
        stats = {
            "train": {"records": len(train_rows), "desirable": desirable},
            "eval": {"records": len(eval_rows), "pairs": len(eval_pairs)},
        }
        export.write_json(out / "data-stats.json", stats)
        log.info(
            "data: %d training rows (%d desirable, %d undesirable); %d eval rows, %d eval pairs",
            len(train_rows),
            desirable,
            len(train_rows) - desirable,
            len(eval_rows),
            len(eval_pairs),
        )

    precision = resolve_precision(spec.training.precision)
    model = preference.load_policy(config, precision)
    steps = sft.planned_steps(config, len(train_rows))
    peft = peft_config(model, spec.tuning, steps)
    preference.keep_start_model(config, model, tokenizer, peft)
    reference = None
    if spec.method.reference_model is not None or peft is None:
        reference = load_reference(config, precision)

    args = KTOConfig(
        **training_kwargs(config, precision, model, has_eval=bool(eval_rows)),
        beta=spec.method.beta,
        max_length=max_length,
        desirable_weight=spec.method.kto.desirable_weight,
        undesirable_weight=spec.method.kto.undesirable_weight,
    )
    reporter = (
        ProgressReporter(out, config.name, config.namespace, config.metrics_port) if main else None
    )
    callbacks: list[Any] = [ProgressCallback(reporter)]
    if spec.checkpoint.every_minutes:
        callbacks.append(TimedCheckpointCallback(spec.checkpoint.every_minutes))
    trainer_class = type("KTOTrainer", (preference.TokenizedPairs, KTOTrainer), {})
    trainer = with_atomic_checkpoints(trainer_class)(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft,
    )
    train_in_fp32(trainer.model)  # TRL put the adapter on
    if spec.tuning.type == "adalora":
        trainer.add_callback(AdaLoraCallback(trainer.model))
    trainable, total = parameter_counts(trainer.model)
    log.info("kto with %s: %d of %d parameters trainable", spec.tuning.type, trainable, total)
    held_out = preference.HeldOutPairs(eval_pairs, tokenizer.pad_token_id, max_length, precision)
    policy_before, reference_scores = held_out.before_training(trainer, spec)
    result, resume = train_resuming(trainer, config, reporter)

    policy_after = held_out.scores(trainer.model)
    metrics: dict[str, Any] = {
        **preference.preference_metrics(
            "kto", policy_before, policy_after, reference_scores, spec.method.beta
        ),
        **run_metrics(trainer, result, resume, started),
        "eval_loss": final_eval_loss(trainer) if eval_rows else None,
    }
    if metrics["preference_accuracy"] is not None and main:
        log.info(
            "held-out preference accuracy: %.1f%% (%d pairs)",
            100 * metrics["preference_accuracy"],
            len(eval_pairs),
        )
    elif main:
        log.info("no held-out preference pairs: preference_accuracy not measured")
    preference.finish(config, trainer, tokenizer, template, metrics, reporter)
    return metrics
