"""The reward-model recipe (AlignmentJob method reward-model): a scalar head trained on pairs.

load tokenizer + chat template -> load preference data -> render every pair as the text a
reward model scores (`rewards.reward_text`, EOS included) and tokenize it -> sequence-
classification model (num_labels=1) + PEFT -> pair accuracy before -> TRL RewardTrainer
(Bradley-Terry loss; resuming from the last complete checkpoint) -> pair accuracy after ->
export final/ (adapters merged: later jobs load it with AutoModelForSequenceClassification),
metrics.json with `pair_accuracy` on the held-out pairs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from lmforge.trainer import export, sharding
from lmforge.trainer.data import Example, load_examples, resolve_chat_template
from lmforge.trainer.launch import rank
from lmforge.trainer.loop import (
    ProgressCallback,
    TimedCheckpointCallback,
    publish,
    run_metrics,
    train_resuming,
    training_kwargs,
    with_atomic_checkpoints,
)
from lmforge.trainer.model import (
    MethodError,
    Precision,
    apply_method,
    load_pretrained,
    load_tokenizer,
    parameter_counts,
    resolve_precision,
    use_liger_kernels,
)
from lmforge.trainer.progress import ProgressReporter
from lmforge.trainer.recipes.sft import planned_steps
from lmforge.trainer.rewards import reward_text
from transformers import AutoModelForSequenceClassification, set_seed

from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)

# (chosen text, rejected text) of one preference pair, as the reward model scores them
Pair = tuple[str, str]


def pair_texts(tokenizer: Any, example: Example) -> Pair:
    """The texts a reward model scores for a preference example (see `rewards.reward_text`)."""

    def text(answer: tuple[dict[str, str], ...]) -> str:
        prompt = [*example.messages, *answer[:-1]]
        return reward_text(tokenizer, prompt, str(answer[-1].get("content", "")))

    return text(example.chosen), text(example.rejected)


def tokenize_pairs(tokenizer: Any, pairs: Sequence[Pair], max_length: int) -> Dataset:
    """`chosen_ids` / `rejected_ids` (TRL's pre-tokenized columns); pairs longer than
    `max_length` are left out (cut, the two sides could become identical)."""
    columns: dict[str, list[list[int]]] = {"chosen_ids": [], "rejected_ids": []}
    dropped = 0
    for chosen, rejected in pairs:
        # add_special_tokens=False: the template and EOS are in the text, as when scoring
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (chosen, rejected)]
        if max(len(i) for i in ids) > max_length:
            dropped += 1
            continue
        columns["chosen_ids"].append(ids[0])
        columns["rejected_ids"].append(ids[1])
    if dropped:
        log.warning("%d of %d pairs are longer than maxSeqLength and left out", dropped, len(pairs))
    if not columns["chosen_ids"]:
        raise MethodError(f"no preference pair fits in dataset.maxSeqLength ({max_length})")
    return Dataset.from_dict(columns)


@torch.no_grad()
def pair_accuracy(
    model: Any, tokenizer: Any, pairs: Sequence[Pair], precision: Precision, batch_size: int = 32
) -> float:
    """Fraction of pairs whose chosen text scores strictly higher than the rejected one. Every
    rank calls it (`sharding.on_every_rank`: each scores its share, and a sharded model's
    forward needs them all)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def wins(share: list[Pair]) -> list[bool]:
        won: list[bool] = []
        for start in range(0, len(share), batch_size):
            batch = share[start : start + batch_size]
            texts = [c for c, _ in batch] + [r for _, r in batch]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with precision.autocast(device):
                scores = model(**inputs.to(device)).logits[:, 0]
            won += (scores[: len(batch)] > scores[len(batch) :]).tolist()
        return won

    won = sharding.on_every_rank(wins, pairs)
    model.train(was_training)
    return sum(won) / len(won)


def run(config: RunConfig) -> dict[str, Any]:
    """Train, evaluate and export a reward model; returns its metrics."""
    started = time.monotonic()
    spec = config.spec
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    main = rank() == 0
    set_seed(spec.training.seed)

    tokenizer = load_tokenizer(config.paths.model, spec.model.trust_remote_code)
    # The template the reward model is trained with is saved with it, so whoever scores with
    # it later renders prompt and response the same way (`rewards.reward_text`).
    tokenizer.chat_template = resolve_chat_template(spec.model.chat_template, tokenizer)
    train_examples, eval_examples = load_examples(
        spec.dataset, Path(config.paths.data or "."), seed=spec.training.seed
    )
    train_pairs = [pair_texts(tokenizer, e) for e in train_examples]
    eval_pairs = [pair_texts(tokenizer, e) for e in eval_examples]
    train_data = tokenize_pairs(tokenizer, train_pairs, spec.dataset.max_seq_length)
    eval_data = (
        tokenize_pairs(tokenizer, eval_pairs, spec.dataset.max_seq_length) if eval_pairs else None
    )
    log.info("data: %d training pairs, %d held-out pairs", len(train_data), len(eval_pairs))

    precision = resolve_precision(spec.training.precision)
    model = load_pretrained(
        AutoModelForSequenceClassification,
        config.paths.model,
        num_labels=1,
        dtype=precision.weights_dtype(spec.tuning),
        trust_remote_code=spec.model.trust_remote_code,
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    if spec.training.liger_kernels:
        use_liger_kernels(model)
    steps = planned_steps(config, len(train_data))
    model = apply_method(model, spec.tuning, steps, task_type="SEQ_CLS")
    trainable, total = parameter_counts(model)
    log.info("method %s: %d of %d parameters trainable", spec.tuning.type, trainable, total)

    from trl import RewardConfig, RewardTrainer

    reporter = (
        ProgressReporter(out, config.name, config.namespace, config.metrics_port) if main else None
    )
    callbacks: list[Any] = [ProgressCallback(reporter)]
    if spec.checkpoint.every_minutes:
        callbacks.append(TimedCheckpointCallback(spec.checkpoint.every_minutes))
    args = RewardConfig(
        **training_kwargs(config, precision, model, has_eval=eval_data is not None),
        max_length=None,  # tokenize_pairs already left out the long pairs
        disable_dropout=True,
    )
    trainer = with_atomic_checkpoints(RewardTrainer)(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    # Scored once the trainer has put the model on its device (every rank takes part).
    accuracy_before = (
        pair_accuracy(trainer.model, tokenizer, eval_pairs, precision) if eval_pairs else None
    )
    result, resume = train_resuming(trainer, config, reporter)

    scorer = trainer.model
    if hasattr(scorer, "merge_and_unload"):  # PEFT: one plain model directory for later jobs
        scorer = scorer.merge_and_unload()
    accuracy = pair_accuracy(scorer, tokenizer, eval_pairs, precision) if eval_pairs else None
    if accuracy is not None and main:
        log.info(
            "held-out pair accuracy: %.1f%% (before training %.1f%%)",
            100 * accuracy,
            100 * (accuracy_before or 0.0),
        )
    metrics: dict[str, Any] = {
        "pair_accuracy": accuracy,
        "pair_accuracy_before": accuracy_before,
        **run_metrics(trainer, result, resume, started),
    }
    weights = sharding.full_state_dict(trainer, scorer)  # every rank: a collective
    if main:
        assert reporter is not None
        final = export.save_final(scorer, tokenizer, tokenizer.chat_template, out, weights)
        publish(config, final, metrics, reporter, trainer=trainer)
    return metrics
