"""The online recipe (AlignmentJob methods grpo, rloo; ppo dispatches to recipes/ppo.py):
sample responses, score them with the job's rewards, update the policy.

load tokenizer + chat template -> load prompts (extra columns such as a reference `answer`
reach the rewards) -> build the rewards (one TRL reward function per component, so each is
logged as rewards/<name>/mean) -> load the policy -> held-out reward before -> TRL GRPOTrainer
or RLOOTrainer (group size generation.samplesPerPrompt; resuming from the last complete
checkpoint) -> held-out reward after -> export final/ (+ merged/), metrics.json with
`reward_before` / `reward_after` (and each component's, as `reward_before/<name>`).

Batch sizes count prompts: each optimizer step trains on `samplesPerPrompt` responses to each
of `batchSize.global` prompts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from lmforge.trainer.data import Example, encode_prompt, load_examples, resolve_chat_template
from lmforge.trainer.launch import rank
from lmforge.trainer.loop import (
    ProgressCallback,
    TimedCheckpointCallback,
    publish,
    run_metrics,
    save_outputs,
    train_resuming,
    training_kwargs,
    with_atomic_checkpoints,
)
from lmforge.trainer.model import (
    MethodError,
    load_model,
    load_tokenizer,
    parameter_counts,
    peft_config,
    resolve_precision,
    train_in_fp32,
)
from lmforge.trainer.progress import ProgressReporter
from lmforge.trainer.recipes import RecipeUnavailable
from lmforge.trainer.rewards import RewardComponent, RewardError, Rewards, ScoreFn, build_rewards
from transformers import set_seed

from lmforge.api.kinds import AlignmentJobSpec, GenerationSpec
from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)

# Methods of this family that TRL implements; ppo (removed from TRL) has its own recipe file.
TRL_METHODS = ("grpo", "rloo")

# Keyword arguments TRL passes to reward functions that are not dataset columns.
_TRL_REWARD_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


# ---------------------------------------------------------------- prompts


def prompt_rows(examples: Sequence[Example]) -> list[dict[str, Any]]:
    """TRL's conversational prompt rows: {"prompt": [messages], **columns}.

    Prompt-format records keep their extra columns; chat records (openai, sharegpt, ...) are
    cut before their last assistant turn, which becomes the `answer` column (so an
    exact-match rule can use SFT data as prompts)."""
    rows = []
    for example in examples:
        messages = [dict(m) for m in example.messages + example.chosen]
        columns: dict[str, Any] = dict(example.columns)
        if messages and messages[-1].get("role") == "assistant":
            columns.setdefault("answer", messages[-1].get("content", ""))
            while messages and messages[-1].get("role") == "assistant":
                messages.pop()
        rows.append({"prompt": messages, **columns})
    return rows


def columns_of(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """The dataset columns of prompt rows (everything but the prompt), as lists."""
    keys = [k for k in (rows[0] if rows else {}) if k != "prompt"]
    return {k: [row.get(k) for row in rows] for k in keys}


# ---------------------------------------------------------------- rewards


class TRLRewardFunction:
    """One reward component in TRL's reward-function signature; `__name__` is the name TRL
    logs it under (rewards/<name>/mean)."""

    def __init__(self, component: RewardComponent) -> None:
        self.__name__ = component.name
        self.score: ScoreFn = component.score

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        columns = {k: v for k, v in kwargs.items() if k not in _TRL_REWARD_KWARGS}
        texts = [completion_text(c) for c in completions]
        return [float(s) for s in self.score(prompts, texts, columns)]


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes conversational ones as [{"role": "assistant", ...}]."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


# ---------------------------------------------------------------- held-out reward


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    chat_template: str | None,
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy responses to `prompts`, rendered as in training (`encode_prompt`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    responses: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            encode_prompt(p, tokenizer, chat_template) for p in prompts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor(
            [[pad] * (width - len(ids)) + ids for ids in encoded], device=device
        )
        mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device
        )
        output = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        responses += [
            text.strip()
            for text in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        ]
    model.train(was_training)
    return responses


def held_out_reward(
    model: Any,
    tokenizer: Any,
    rewards: Rewards,
    rows: Sequence[dict[str, Any]],
    chat_template: str | None,
    generation: GenerationSpec,
) -> dict[str, float]:
    """Mean total reward of greedy responses to held-out prompts, and each component's mean
    (unweighted) under its name."""
    prompts = [row["prompt"] for row in rows]
    responses = generate(model, tokenizer, prompts, chat_template, generation.max_new_tokens)
    total, parts = rewards(prompts, responses, columns_of(rows))
    means = {"reward": sum(total) / len(total)}
    means |= {name: sum(scores) / len(scores) for name, scores in parts.items()}
    return means


# ---------------------------------------------------------------- TRL trainers


def trainer_classes(method: str) -> tuple[type[Any], type[Any]]:
    """(config class, trainer class) of a TRL online method."""
    if method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer
    from trl import RLOOConfig, RLOOTrainer

    return RLOOConfig, RLOOTrainer


def online_kwargs(spec: AlignmentJobSpec, rewards: Rewards) -> dict[str, Any]:
    """The method's arguments for GRPOConfig / RLOOConfig (on top of `training_kwargs`)."""
    generation = spec.generation
    kwargs: dict[str, Any] = {
        "num_generations": generation.samples_per_prompt,
        "max_completion_length": generation.max_new_tokens,
        "temperature": generation.temperature,
        "top_p": generation.top_p,
        "beta": spec.method.beta,
        "reward_weights": [c.weight for c in rewards.components],
        "disable_dropout": True,
        "log_completions": False,
        # the trainer feeds generated batches, not a model input the Trainer can count
        "include_num_input_tokens_seen": "no",
    }
    if generation.backend == "vllm":
        if not torch.cuda.is_available():
            raise MethodError(
                "generation.backend vllm needs a CUDA GPU; this machine has none. Use backend "
                "transformers here, or run the job on a GPU node."
            )
        # vLLM in the training processes, sharing their GPUs (no separate server to run).
        kwargs |= {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": True}
    return kwargs


def batch_in_responses(kwargs: dict[str, Any], samples_per_prompt: int) -> dict[str, Any]:
    """The spec's batch sizes count prompts; TRL's count responses."""
    return kwargs | {
        "per_device_train_batch_size": kwargs["per_device_train_batch_size"] * samples_per_prompt,
        "per_device_eval_batch_size": kwargs["per_device_eval_batch_size"] * samples_per_prompt,
    }


# ---------------------------------------------------------------- the recipe


def run(config: RunConfig) -> dict[str, Any]:
    """Align a policy with online rewards; returns its metrics."""
    spec = config.spec
    assert isinstance(spec, AlignmentJobSpec)
    method = spec.method.type
    if method not in TRL_METHODS:  # ppo and raft have recipes of their own (recipes table)
        raise RecipeUnavailable(f"method {method} is not an online method")

    started = time.monotonic()
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    main = rank() == 0
    set_seed(spec.training.seed)
    generation = spec.generation
    if generation.workers > 1:
        log.warning(
            "generation.workers is used by raft and ppo; %s generates in each training "
            "process (scale with distributed.processesPerNode / nodes)",
            method,
        )

    tokenizer = load_tokenizer(config.paths.model, spec.model.trust_remote_code)
    template = resolve_chat_template(spec.model.chat_template, tokenizer)
    if template is None:
        raise MethodError(
            f"{method} samples chat responses: model.chatTemplate none is not supported; "
            "use auto or a named template"
        )
    tokenizer.chat_template = template  # TRL renders the prompts with it, as training did
    train_examples, eval_examples = load_examples(
        spec.dataset, Path(config.paths.data or "."), seed=spec.training.seed
    )
    train_rows, eval_rows = prompt_rows(train_examples), prompt_rows(eval_examples)
    log.info("data: %d training prompts, %d held-out prompts", len(train_rows), len(eval_rows))
    try:
        rewards = build_rewards(config, tokenizer)
    except RewardError as err:
        raise MethodError(str(err)) from None

    precision = resolve_precision(spec.training.precision)
    model = load_model(
        config.paths.model,
        method=spec.tuning,
        training=spec.training,
        strategy=spec.distributed.strategy,
        precision=precision,
        trust_remote_code=spec.model.trust_remote_code,
    )
    # The spec's batch sizes count prompts: steps are planned per prompt batch.
    steps = spec.training.max_steps or max(
        1, len(train_rows) // (spec.training.batch_size.global_ or 1)
    )
    adapter = peft_config(model, spec.tuning, steps)

    def evaluate(policy: Any) -> dict[str, float] | None:
        if not eval_rows or not main:
            return None
        return held_out_reward(policy, tokenizer, rewards, eval_rows, template, generation)

    before = evaluate(model)
    if before is not None:
        log.info("held-out reward before training: %s", _describe(before))

    reporter = (
        ProgressReporter(out, config.name, config.namespace, config.metrics_port) if main else None
    )
    callbacks: list[Any] = [ProgressCallback(reporter)]
    if spec.checkpoint.every_minutes:
        callbacks.append(TimedCheckpointCallback(spec.checkpoint.every_minutes))
    config_class, trainer_class = trainer_classes(method)
    kwargs = training_kwargs(config, precision, model, has_eval=False)
    args = config_class(
        **batch_in_responses(kwargs, generation.samples_per_prompt) | online_kwargs(spec, rewards)
    )
    trainer = with_atomic_checkpoints(trainer_class)(
        model=model,
        reward_funcs=[TRLRewardFunction(c) for c in rewards.components],
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=adapter,
    )
    train_in_fp32(trainer.model)  # TRL put the adapter on
    trainable, total = parameter_counts(trainer.model)
    log.info("method %s: %d of %d parameters trainable", spec.tuning.type, trainable, total)

    result, resume = train_resuming(trainer, config, reporter)

    after = evaluate(trainer.model)
    if after is not None:
        log.info("held-out reward after training: %s", _describe(after))
    metrics: dict[str, Any] = {
        "reward_before": before["reward"] if before else None,
        "reward_after": after["reward"] if after else None,
        **run_metrics(trainer, result, resume, started),
    }
    for label, means in (("before", before), ("after", after)):
        for name, value in (means or {}).items():
            if name != "reward":
                metrics[f"reward_{label}/{name}"] = value
    if main:
        assert reporter is not None
        final = save_outputs(config, trainer.model, tokenizer, template)
        publish(config, final, metrics, reporter, trainer=trainer)
    return metrics


def _describe(means: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in means.items())
