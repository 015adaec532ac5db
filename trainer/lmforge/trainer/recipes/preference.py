"""The preference recipe (AlignmentJob dpo, ipo, simpo, orpo): offline preference optimisation.

load tokenizer -> load pairs -> encode them as SFT renders conversations -> load model (and the
reference) -> set up TRL's trainer -> score the held-out pairs -> train (resuming from the last
complete checkpoint) -> score again -> export final/ (+ merged/), metrics.json, model card.
Every rank takes part in the scoring and the export (under FSDP or ZeRO-3 each forward pass
and gathering the weights are collectives).

dpo and ipo are TRL's DPOTrainer (loss_type sigmoid / ipo) against a frozen reference: the
spec's referenceModel, else the starting model (with PEFT, TRL disables the adapter for it).
simpo is CPOTrainer with loss_type simpo and no NLL term; orpo is ORPOTrainer; neither uses a
reference. `preference_accuracy` is the share of held-out pairs each method itself ranks right:
the implicit reward margin over the reference for dpo/ipo, the length-normalised
log-probability margin for simpo/orpo.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from lmforge.trainer import export, pairs, sharding
from lmforge.trainer.data import load_examples, resolve_chat_template
from lmforge.trainer.launch import rank
from lmforge.trainer.loop import (
    AdaLoraCallback,
    ProgressCallback,
    TimedCheckpointCallback,
    final_eval_loss,
    publish,
    run_metrics,
    save_outputs,
    train_resuming,
    training_kwargs,
    with_atomic_checkpoints,
)
from lmforge.trainer.model import (
    Precision,
    adapter_base,
    load_model,
    load_reference,
    load_tokenizer,
    parameter_counts,
    peft_config,
    resolve_precision,
    train_in_fp32,
)
from lmforge.trainer.progress import ProgressReporter
from lmforge.trainer.recipes import sft
from transformers import set_seed

from lmforge.api.kinds import AlignmentJobSpec
from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the methods


class TokenizedPairs:
    """DPOTrainer / KTOTrainer mixin: the records are tokenized already (`pairs.encode_pairs`),
    so TRL's own rendering and tokenization are skipped."""

    def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        return dataset


class TokenizedPairRows:
    """CPOTrainer / ORPOTrainer mixin: their row layout built from our token ids."""

    max_length: int

    def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, list[int]]:
        return pair_row(feature, self.max_length)


def pair_row(feature: dict[str, Any], max_length: int) -> dict[str, list[int]]:
    """CPO/ORPO's tokenized row: prompt, and prompt + answer with the prompt masked out of the
    labels, truncated to max_length (keeping the start)."""
    prompt = list(feature["prompt_ids"])
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = list(feature[f"{side}_ids"])
        ids = (prompt + answer)[:max_length]
        row[f"{side}_input_ids"] = ids
        row[f"{side}_attention_mask"] = [1] * len(ids)
        row[f"{side}_labels"] = ([-100] * len(prompt) + answer)[:max_length]
    return row


@dataclass(frozen=True)
class PreferenceMethod:
    """How one method of the family trains and how it ranks a pair."""

    trainer: Callable[[], tuple[type[Any], type[Any]]]  # -> (trainer class, config class)
    options: Callable[[AlignmentJobSpec], dict[str, Any]]  # method kwargs of the TRL config
    uses_reference: bool  # margin over a reference (dpo, ipo) or the policy alone (simpo, orpo)


def _dpo() -> tuple[type[Any], type[Any]]:
    from trl import DPOConfig, DPOTrainer

    return type("DPOTrainer", (TokenizedPairs, DPOTrainer), {}), DPOConfig


def _cpo() -> tuple[type[Any], type[Any]]:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return type("CPOTrainer", (TokenizedPairRows, CPOTrainer), {}), CPOConfig


def _orpo() -> tuple[type[Any], type[Any]]:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return type("ORPOTrainer", (TokenizedPairRows, ORPOTrainer), {}), ORPOConfig


METHODS = {
    "dpo": PreferenceMethod(_dpo, lambda s: {"loss_type": ["sigmoid"]}, uses_reference=True),
    "ipo": PreferenceMethod(_dpo, lambda s: {"loss_type": ["ipo"]}, uses_reference=True),
    "simpo": PreferenceMethod(
        _cpo,
        lambda s: {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": s.method.simpo.gamma},
        uses_reference=False,
    ),
    "orpo": PreferenceMethod(_orpo, lambda s: {}, uses_reference=False),
}


# ---------------------------------------------------------------- the recipe


def run(config: RunConfig) -> dict[str, Any]:
    """Train, score and export one dpo/ipo/simpo/orpo run; returns its metrics."""
    started = time.monotonic()
    spec = config.spec
    assert isinstance(spec, AlignmentJobSpec)
    method = METHODS[spec.method.type]
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
    encode = {"tokenizer": tokenizer, "chat_template": template, "method": spec.method.type}
    train_pairs = pairs.encode_pairs(train_examples, **encode)
    eval_pairs = pairs.encode_pairs(eval_examples, **encode)
    stats = data_stats(train_pairs, eval_pairs, max_length)
    train_pairs = pairs.fitting(train_pairs, max_length)
    eval_pairs = [r for r in eval_pairs if pairs.fits(r, max_length)]
    if main:
        export.write_json(out / "data-stats.json", stats)
        log.info("data: %s", describe_stats(stats))

    precision = resolve_precision(spec.training.precision)
    model = load_policy(config, precision)
    steps = sft.planned_steps(config, len(train_pairs))
    peft = peft_config(model, spec.tuning, steps)
    keep_start_model(config, model, tokenizer, peft)
    reference = None
    if method.uses_reference and (spec.method.reference_model is not None or peft is None):
        reference = load_reference(config, precision)

    trainer_class, config_class = method.trainer()
    args = config_class(
        **training_kwargs(config, precision, model, has_eval=bool(eval_pairs)),
        beta=spec.method.beta,
        max_length=max_length,
        **method.options(spec),
    )
    reporter = (
        ProgressReporter(out, config.name, config.namespace, config.metrics_port) if main else None
    )
    callbacks: list[Any] = [ProgressCallback(reporter)]
    if spec.checkpoint.every_minutes:
        callbacks.append(TimedCheckpointCallback(spec.checkpoint.every_minutes))
    extra: dict[str, Any] = {"ref_model": reference} if method.uses_reference else {}
    trainer = with_atomic_checkpoints(trainer_class)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_pairs),
        eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft,
        **extra,
    )
    train_in_fp32(trainer.model)  # TRL put the adapter on
    if spec.tuning.type == "adalora":
        trainer.add_callback(AdaLoraCallback(trainer.model))
    trainable, total = parameter_counts(trainer.model)
    log.info(
        "%s with %s: %d of %d parameters trainable",
        spec.method.type,
        spec.tuning.type,
        trainable,
        total,
    )
    held_out = HeldOutPairs(eval_pairs, tokenizer.pad_token_id, max_length, precision)
    policy_before, reference_scores = held_out.before_training(trainer, spec)
    result, resume = train_resuming(trainer, config, reporter)

    policy_after = held_out.scores(trainer.model)
    metrics: dict[str, Any] = {
        **preference_metrics(
            spec.method.type, policy_before, policy_after, reference_scores, spec.method.beta
        ),
        **run_metrics(trainer, result, resume, started),
        "eval_loss": final_eval_loss(trainer) if eval_pairs else None,
    }
    if metrics["preference_accuracy"] is not None and main:
        log.info(
            "held-out preference accuracy: %.1f%% (%d pairs)",
            100 * metrics["preference_accuracy"],
            len(eval_pairs),
        )
    finish(config, trainer, tokenizer, template, metrics, reporter)
    return metrics


# ---------------------------------------------------------------- steps (shared with kto)


def load_policy(config: RunConfig, precision: Precision) -> Any:
    spec = config.spec
    return load_model(
        config.paths.model,
        method=spec.tuning,
        training=spec.training,
        strategy=spec.distributed.strategy,
        precision=precision,
        trust_remote_code=spec.model.trust_remote_code,
    )


def keep_start_model(config: RunConfig, model: Any, tokenizer: Any, peft: Any) -> None:
    """A run that starts from an adapter (merged into its base on load) and trains a new adapter
    keeps the merged start model as base/: the new adapter in final/ only makes sense on it."""
    if peft is not None and rank() == 0 and adapter_base(config.paths.model) is not None:
        base = export.save_start_model(model, tokenizer, config.output_dir)
        log.info("start model (adapter %s merged) kept at %s", config.paths.model, base)


@dataclass
class HeldOutPairs:
    """The held-out pairs, and how they are scored: by every rank (`pairs.pair_logps`), on the
    device the trainer put the model on, as the run computes."""

    records: list[pairs.Record]
    pad_token_id: int
    max_length: int
    precision: Precision

    def scores(self, model: Any) -> pairs.SequenceLogps:
        return pairs.pair_logps(
            model,
            self.records,
            pad_token_id=self.pad_token_id,
            max_length=self.max_length,
            precision=self.precision,
        )

    def before_training(
        self, trainer: Any, spec: AlignmentJobSpec
    ) -> tuple[pairs.SequenceLogps, pairs.SequenceLogps]:
        """The scores under the start policy and under the reference (the same scores when
        the reference is the start model: no second pass). Taken once the trainer has placed
        the policy and prepared the reference (TRL shards it as it shards the policy)."""
        policy = trainer.model
        adapter_off = getattr(policy, "disable_adapter", None)  # PEFT: the start model
        with adapter_off() if adapter_off is not None else contextlib.nullcontext():
            before = self.scores(policy)
        if spec.method.reference_model is None:
            return before, before
        return before, self.scores(trainer.ref_model)


def finish(
    config: RunConfig,
    trainer: Any,
    tokenizer: Any,
    template: str | None,
    metrics: dict[str, Any],
    reporter: ProgressReporter | None,
) -> None:
    """final/ (+ merged/), model card, loss curve, metrics.json; the progress channel closes.
    Every rank calls it: a sharded model's full weights are gathered from all of them."""
    weights = sharding.full_state_dict(trainer)
    if rank() != 0:
        return
    assert reporter is not None
    out = config.output_dir
    start = config.paths.model
    model = trainer.model
    if (out / "base").is_dir() and hasattr(model, "peft_config"):
        start = str(out / "base")  # see start_model
        for adapter in model.peft_config.values():
            adapter.base_model_name_or_path = start
    final = save_outputs(config, model, tokenizer, template, start=start, weights=weights)
    publish(config, final, metrics, reporter, trainer=trainer)


# ---------------------------------------------------------------- metrics


def preference_metrics(
    method: str,
    before: pairs.SequenceLogps,
    after: pairs.SequenceLogps,
    reference: pairs.SequenceLogps,
    beta: float | None,
) -> dict[str, float | None]:
    """The held-out figures: `preference_accuracy` as the method ranks pairs, its mean reward
    margin (after and before training), and the policy's own (length-normalised) likelihood
    ranking before and after."""

    def margins_of(policy: pairs.SequenceLogps) -> Any:
        if method in ("simpo", "orpo"):
            return pairs.normalised_margins(policy)
        return pairs.reference_margins(policy, reference)  # dpo, ipo, kto

    def mean(margins: Any) -> float | None:
        return float(margins.mean()) * (beta or 1.0) if margins.numel() else None

    margins = margins_of(after)
    return {
        "preference_accuracy": pairs.accuracy(margins),
        "reward_margin": mean(margins),
        "reward_margin_before": mean(margins_of(before)),
        "likelihood_accuracy_before": pairs.accuracy(pairs.normalised_margins(before)),
        "likelihood_accuracy": pairs.accuracy(pairs.normalised_margins(after)),
        "eval_pairs": float(margins.numel()),
    }


def data_stats(
    train: list[pairs.Record], evaluation: list[pairs.Record], max_length: int
) -> dict[str, Any]:
    def one(records: list[pairs.Record]) -> dict[str, Any]:
        lengths = [
            len(r["prompt_ids"]) + max(len(r.get("chosen_ids", [])), len(r.get("rejected_ids", [])))
            for r in records
        ]
        return {
            "records": len(records),
            "dropped": sum(not pairs.fits(r, max_length) for r in records),
            "truncated": sum(n > max_length for n in lengths),
            "max_length": max(lengths, default=0),
            "mean_length": sum(lengths) / len(lengths) if lengths else 0.0,
        }

    return {"train": one(train), "eval": one(evaluation) if evaluation else None}


def describe_stats(stats: dict[str, Any]) -> str:
    train, evaluation = stats["train"], stats["eval"]
    text = (
        f"{train['records']} training records ({train['dropped']} dropped: prompt longer than "
        f"maxSeqLength, {train['truncated']} truncated)"
    )
    if evaluation:
        text += f"; {evaluation['records']} eval records"
    return text
