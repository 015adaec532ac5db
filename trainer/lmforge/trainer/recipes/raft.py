"""The RAFT recipe (AlignmentJob method raft): reward-ranked fine-tuning, as in LMFlow's paper
(Dong et al., 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment").

load policy, prompts, rewards -> held-out reward before -> per round: sample K responses per
prompt, score them, keep the best of each prompt (local) or the top fraction of the round
(global), fine-tune on the kept ones with the FinetuneJob loss (tokens of the answer only),
checkpoint the round atomically -> held-out reward after -> export final/, metrics.json

The optimizer (and its state) lives across rounds. Each round trains `training.epochs` passes
over its kept responses, or `training.maxSteps` optimizer steps when that is set, at a constant
learning rate. A restarted run continues after its last complete round.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from lmforge.trainer import export
from lmforge.trainer.data import DataCollator, Example, resolve_chat_template, tokenize_examples
from lmforge.trainer.loop import publish
from lmforge.trainer.model import Precision, parameter_counts, weight_dtypes
from lmforge.trainer.onpolicy import (
    held_out_reward,
    load_prompts,
    load_round,
    mean,
    resume_point,
    round_metrics,
    round_prompts,
    save_round,
    score,
    trains_here,
)
from lmforge.trainer.policy import (
    build_optimizer,
    load_policy,
    load_policy_tokenizer,
    policy_precision,
)
from lmforge.trainer.progress import ProgressReporter
from lmforge.trainer.rewards import build_rewards
from lmforge.trainer.rollouts import (
    Completion,
    Sampling,
    rollout_engine,
)
from transformers import set_seed

from lmforge.api.kinds import AlignmentJobSpec
from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)


def select_local(rewards: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """(prompt, response) of the best response of every prompt (the first one on ties)."""
    return [(i, max(range(len(r)), key=lambda j: (r[j], -j))) for i, r in enumerate(rewards) if r]


def select_global(rewards: Sequence[Sequence[float]], fraction: float) -> list[tuple[int, int]]:
    """(prompt, response) of the top `fraction` of all responses of the round (at least one),
    in prompt order."""
    flat = [(score, i, j) for i, r in enumerate(rewards) for j, score in enumerate(r)]
    keep = max(1, math.ceil(fraction * len(flat)))
    best = sorted(flat, key=lambda t: (-t[0], t[1], t[2]))[:keep]
    return sorted((i, j) for _, i, j in best)


def finetune(
    model: torch.nn.Module,
    optimizer: Any,
    records: list[dict[str, list[int]]],
    collator: DataCollator,
    *,
    batch_size: int,
    accumulation: int,
    steps: int,
    max_grad_norm: float,
    seed: int,
    precision: Precision,
) -> float:
    """`steps` optimizer steps of the causal-LM loss on `records` (reshuffled every pass);
    returns the mean loss."""
    model.train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    for _ in range(steps):
        for _ in range(accumulation):
            if len(order) < batch_size:
                refill = list(range(len(records)))
                rng.shuffle(refill)
                order += refill
            batch = collator([records[i] for i in order[:batch_size]])
            del order[:batch_size]
            with precision.autocast(device):
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            (loss / accumulation).backward()
            losses.append(float(loss.detach()))
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return mean(losses)


def run(config: RunConfig) -> dict[str, Any]:
    """Align with RAFT rounds; returns the metrics written to metrics.json."""
    started = time.monotonic()
    spec = config.spec
    assert isinstance(spec, AlignmentJobSpec)
    if not trains_here():
        return {}
    raft, training = spec.method.raft, spec.training
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    set_seed(training.seed)

    tokenizer = load_policy_tokenizer(config)
    template = resolve_chat_template(spec.model.chat_template, tokenizer)
    prompts, held_out = load_prompts(config, tokenizer, template)
    rewards = build_rewards(config, tokenizer)
    precision = policy_precision(config)
    model = load_policy(config, precision)
    trainable, total = parameter_counts(model)
    log.info("method %s: %d of %d parameters trainable", spec.tuning.type, trainable, total)
    optimizer = build_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    sampling = Sampling.of(spec.generation, batch_size=max(1, training.batch_size.per_device))
    collator = DataCollator(tokenizer)
    per_device = training.batch_size.per_device
    accumulation = max(1, (training.batch_size.global_ or per_device) // per_device)
    tokenize = {
        "tokenizer": tokenizer,
        "chat_template": template,
        "max_seq_length": spec.dataset.max_seq_length,
        "train_on_prompt": spec.dataset.train_on_prompt,
        "packing": False,
    }

    state: dict[str, Any] = {"rounds": []}
    resume = resume_point(config)
    if resume is not None:
        state = load_round(resume, {"policy": model}, optimizer)
        log.info("resuming from %s (round %d of %d)", resume, state["step"], raft.iterations)
    else:
        before, before_parts = held_out_reward(
            model, tokenizer, held_out, rewards, sampling, precision
        )
        state |= {"reward_before": before, "reward_components_before": before_parts}
        log.info("held-out reward before RAFT: %.4f %s", before, _describe(before_parts))

    reporter = ProgressReporter(out, config.name, config.namespace, config.metrics_port)
    engine = rollout_engine(config, model, tokenizer, precision)
    first_round = len(state["rounds"])
    try:
        for index in range(first_round, raft.iterations):
            chosen = round_prompts(len(prompts), raft.prompts_per_iteration, training.seed, index)
            batch = prompts.subset(chosen)
            engine.sync(model)
            groups = engine.generate(batch.ids, sampling, seed=training.seed * 7919 + index)
            grouped, parts = score(rewards, batch, groups)
            kept = (
                select_local(grouped)
                if raft.selection == "local"
                else select_global(grouped, raft.top_fraction)
            )
            data = tokenize_examples(
                [_kept_example(batch.messages[i], groups[i][j]) for i, j in kept], **tokenize
            )
            steps = _round_steps(config, len(data.records), per_device * accumulation)
            loss = finetune(
                model,
                optimizer,
                data.records,
                collator,
                batch_size=per_device,
                accumulation=accumulation,
                steps=steps,
                max_grad_norm=training.max_grad_norm,
                seed=training.seed * 7919 + index,
                precision=precision,
            )
            summary = {
                "round": index + 1,
                "reward_mean": mean([r for group in grouped for r in group]),
                "kept_reward_mean": mean([grouped[i][j] for i, j in kept]),
                "kept": len(kept),
                "components": {name: mean(values) for name, values in parts.items()},
                "steps": steps,
                "loss": loss,
            }
            state["rounds"].append(summary)
            path = save_round(
                out / "checkpoints",
                index + 1,
                {"policy": model},
                optimizer,
                state,
                spec.checkpoint.keep,
            )
            reporter.checkpoint(index + 1, path)
            reporter.update(step=index + 1, total_steps=raft.iterations, loss=loss, force=True)
            log.info(
                "round %d/%d: mean reward %.4f, kept %d (mean %.4f), %d steps, loss %.4f",
                index + 1,
                raft.iterations,
                summary["reward_mean"],
                len(kept),
                summary["kept_reward_mean"],
                steps,
                loss,
            )
    finally:
        engine.close()

    after, after_parts = held_out_reward(model, tokenizer, held_out, rewards, sampling, precision)
    log.info("held-out reward after RAFT: %.4f %s", after, _describe(after_parts))
    metrics: dict[str, Any] = {
        **round_metrics(state, after, after_parts),
        "resumed_from_round": state["step"] if resume is not None else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "precision": precision.name,
        **weight_dtypes(model),
        "wall_time_seconds": round(time.monotonic() - started, 2),
    }
    final = export.save_final(model, tokenizer, template, out)
    publish(config, final, metrics, reporter, step=len(state["rounds"]))
    return metrics


def _round_steps(config: RunConfig, records: int, batch: int) -> int:
    """Optimizer steps of one round: training.maxSteps, else training.epochs passes over the
    kept responses (none when nothing trainable was kept)."""
    if records == 0:
        return 0
    training = config.spec.training
    return training.max_steps or max(1, math.ceil((training.epochs or 1.0) * records / batch))


def _kept_example(prompt: tuple[dict[str, str], ...], completion: Completion) -> Example:
    """A kept response as an SFT conversation: the prompt, then the response as the answer."""
    return Example(messages=(*prompt, {"role": "assistant", "content": completion.text}))


def _describe(parts: dict[str, float]) -> str:
    return "(" + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()) + ")" if parts else ""
