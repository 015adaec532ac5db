"""The SFT recipe (FinetuneJob): continued pretraining or SFT, full or parameter-efficient.

load tokenizer -> load + validate data -> tokenize -> load model -> apply method
-> score before -> train (resuming from the last complete checkpoint) -> score after
-> export final/ (+ merged/), metrics.json, loss.png, model card
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from lmforge.trainer import export, sharding
from lmforge.trainer.attention import padding_free
from lmforge.trainer.data import DataCollator, prepare_once_per_node, resolve_chat_template
from lmforge.trainer.evaluate import exact_match_accuracy, perplexity
from lmforge.trainer.launch import node_rank, rank
from lmforge.trainer.loop import (
    AdaLoraCallback,
    AtomicCheckpointTrainer,
    LisaCallback,
    ProgressCallback,
    TimedCheckpointCallback,
    final_eval_loss,
    publish,
    run_metrics,
    save_outputs,
    train_resuming,
    training_arguments,
)
from lmforge.trainer.model import (
    apply_method,
    load_model,
    load_tokenizer,
    parameter_counts,
    resolve_precision,
)
from lmforge.trainer.progress import ProgressReporter
from transformers import set_seed

from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)


def planned_steps(config: RunConfig, records: int) -> int:
    """Optimizer steps the run will take (for schedules that need it up front)."""
    training = config.spec.training
    if training.max_steps is not None:
        return training.max_steps
    per_step = training.batch_size.global_ or 1
    return max(1, math.ceil(records / per_step) * math.ceil(training.epochs or 1))


def run(config: RunConfig) -> dict[str, Any]:
    """Train, evaluate and export one FinetuneJob run; returns its metrics."""
    started = time.monotonic()
    spec = config.spec
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    main = rank() == 0
    set_seed(spec.training.seed)

    tokenizer = load_tokenizer(config.paths.model, spec.model.trust_remote_code)
    template = resolve_chat_template(spec.model.chat_template, tokenizer)
    # The pre-flight: bad or untrainable data fails here, before any model weights load.
    data = prepare_once_per_node(
        spec.dataset,
        tokenizer,
        chat_template=template,
        continued_pretraining=spec.task == "continued-pretraining",
        base_dir=Path(config.paths.data or "."),
        seed=spec.training.seed,
        cache_dir=out / "data-cache" / f"node-{node_rank()}",
    )
    eval_examples = data.eval_examples
    if main:
        export.write_json(out / "data-stats.json", data.stats)
        log.info("data: %s", data.summary)
        for warning in data.warnings:
            log.warning("data: %s", warning)

    precision = resolve_precision(spec.training.precision)
    model = load_model(
        config.paths.model,
        method=spec.tuning,
        training=spec.training,
        strategy=spec.distributed.strategy,
        precision=precision,
        trust_remote_code=spec.model.trust_remote_code,
    )
    steps = planned_steps(config, len(data.train))
    model = apply_method(model, spec.tuning, steps)
    trainable, total = parameter_counts(model)
    log.info("method %s: %d of %d parameters trainable", spec.tuning.type, trainable, total)

    scoring = spec.evaluation.metric == "exact-match" and bool(eval_examples) and main

    def score() -> float | None:
        if not scoring:
            return None
        return exact_match_accuracy(
            model,
            tokenizer,
            eval_examples,
            chat_template=template,
            max_new_tokens=spec.evaluation.max_new_tokens,
            max_samples=spec.evaluation.max_samples,
        )

    accuracy_before = score()
    if accuracy_before is not None:
        log.info("exact-match accuracy before training: %.1f%%", 100 * accuracy_before)

    reporter = (
        ProgressReporter(out, config.name, config.namespace, config.metrics_port) if main else None
    )
    callbacks: list[Any] = [ProgressCallback(reporter)]
    if spec.checkpoint.every_minutes:
        callbacks.append(TimedCheckpointCallback(spec.checkpoint.every_minutes))
    if spec.tuning.type == "lisa":
        callbacks.append(
            LisaCallback(
                model,
                spec.tuning.lisa.active_layers,
                spec.tuning.lisa.interval_steps,
                spec.training.seed,
            )
        )
    if spec.tuning.type == "adalora":
        callbacks.append(AdaLoraCallback(model))
    args = training_arguments(config, precision, model, has_eval=data.eval is not None)
    if "position_ids" in data.train.column_names:
        # A packed batch has no 2-D attention_mask to count real tokens by (padding-free: none
        # at all; else the 4-D block mask). Count every token: padding-free rows have no
        # padding, and block-masked rows are nearly full.
        args.include_num_input_tokens_seen = "all"
    trainer = AtomicCheckpointTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=DataCollator(tokenizer, padding_free=padding_free(model)),
        callbacks=callbacks,
    )
    result, resume = train_resuming(trainer, config, reporter)
    eval_loss = final_eval_loss(trainer) if data.eval is not None else None
    # A sharded model generates only with every rank taking part; score final/ elsewhere.
    accuracy_after = None if sharding.is_sharded(trainer) else score()
    if accuracy_after is not None:
        log.info("exact-match accuracy after training: %.1f%%", 100 * accuracy_after)

    metrics: dict[str, Any] = {
        **run_metrics(trainer, result, resume, started),
        "eval_loss": eval_loss,
        "perplexity": perplexity(eval_loss),
        "tokens_per_second": _tokens_per_second(trainer, result.metrics.get("train_runtime")),
        **data.metrics(),
    }
    if accuracy_after is not None:
        metrics |= {"exact_match_before": accuracy_before, "exact_match": accuracy_after}
    weights = sharding.full_state_dict(trainer)  # every rank: gathering shards is collective
    if main:
        assert reporter is not None
        final = save_outputs(config, trainer.model, tokenizer, template, weights=weights)
        publish(config, final, metrics, reporter, trainer=trainer)
    return metrics


def _tokens_per_second(trainer: Any, train_seconds: float | None) -> float | None:
    """Training throughput (input tokens over all processes per second; padding is left out
    unless packed)."""
    tokens = getattr(trainer.state, "num_input_tokens_seen", 0) or 0
    return round(tokens / train_seconds, 2) if tokens and train_seconds else None
