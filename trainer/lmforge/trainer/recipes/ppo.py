"""The PPO recipe (AlignmentJob method ppo): TRL removed its PPOTrainer, so this is our own
compact PPO (Schulman et al., 2017) with the RLHF conventions of Ziegler et al. (2019):

load policy + value head (a linear head on the policy's last hidden state), a frozen reference
(method.referenceModel, the adapter switched off for PEFT, or a copy of the starting policy),
prompts, rewards -> held-out reward before -> per rollout step: sample responses, score them,
per-token reward = -beta * (log pi - log pi_ref) plus the score on the last token, advantages
by GAE (ppo.gamma, ppo.lam), whitened; ppo.epochs passes over the batch in minibatches with
the clipped policy loss and the clipped value loss -> checkpoint -> held-out reward after ->
export final/ (the policy; the value head is kept in the checkpoints), metrics.json

A rollout step takes `training.batchSize.global` prompts (x generation.samplesPerPrompt
responses); `training.maxSteps` rollout steps, else `training.epochs` passes over the prompts.
Minibatches have `training.batchSize.perDevice` responses, one optimizer step each.
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
from lmforge.trainer.data import resolve_chat_template
from lmforge.trainer.loop import publish
from lmforge.trainer.model import Precision, load_reference, weight_dtypes
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
from torch import nn
from transformers import set_seed

from lmforge.api.kinds import AlignmentJobSpec
from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the PPO objective (pure)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the unmasked entries."""
    m = masked_mean(values, mask)
    var = masked_mean((values - m) ** 2, mask)
    return (values - m) * torch.rsqrt(var + eps) * mask


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-token rewards [B, T]: -beta * (log pi - log pi_ref) on every response token, plus
    the sequence's score on its last token."""
    rewards = -beta * (logprobs - ref_logprobs) * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(len(scores))
    rewards[rows, last] += scores * (mask.sum(dim=1) > 0)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens [B, T] (responses left-aligned,
    `mask` 1 on their tokens). The value after a response's last token is 0 (the episode ends).
    Returns (advantages, returns = advantages + values), both 0 where masked."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """PPO's clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)),
    r = exp(log pi - log pi_old)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return masked_mean(torch.maximum(unclipped, clipped), mask)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """0.5 * mean over tokens of max((V - R)^2, (V_clipped - R)^2), where V_clipped stays
    within clip_range of the rollout's value."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ---------------------------------------------------------------- model pieces


class ValueHead(nn.Module):
    """V(s): a linear head on the policy's last hidden state (starts at 0)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def disable_dropout(model: nn.Module) -> None:
    """PPO's probability ratios must compare the same function, not two dropout masks."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class RolloutBatch:
    """Prompt + response token ids, right-padded for training forwards, and where each
    response sits: response token t of row b is at position start[b] + t."""

    def __init__(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad: int
    ) -> None:
        rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
        width = max(len(r) for r in rows)
        steps = max(1, max(len(r) for r in responses))
        self.input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        self.attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        self.tokens = torch.full((len(rows), steps), pad, dtype=torch.long)
        self.mask = torch.zeros((len(rows), steps))
        self.start = torch.tensor([len(p) for p in prompts])
        for i, (row, response) in enumerate(zip(rows, responses, strict=True)):
            self.input_ids[i, : len(row)] = torch.tensor(row)
            self.attention_mask[i, : len(row)] = 1
            self.tokens[i, : len(response)] = torch.tensor(list(response), dtype=torch.long)
            self.mask[i, : len(response)] = 1

    def __len__(self) -> int:
        return len(self.input_ids)


def policy_forward(
    model: nn.Module,
    value_head: ValueHead | None,
    batch: RolloutBatch,
    rows: torch.Tensor,
    temperature: float,
    precision: Precision,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probabilities of the response tokens [b, T], values of the states before them).

    Log-probabilities are those of the distribution the responses were sampled from (logits
    divided by the sampling temperature), so the PPO ratio starts at 1. The model computes
    under the run's autocast; the log-probabilities and the value head in fp32."""
    device = next(model.parameters()).device
    with precision.autocast(device):
        out = model(
            input_ids=batch.input_ids[rows].to(device),
            attention_mask=batch.attention_mask[rows].to(device),
            output_hidden_states=value_head is not None,
        )
    steps = batch.tokens.shape[1]
    # the logits at position p predict token p + 1
    positions = (batch.start[rows, None] + torch.arange(steps)[None] - 1).clamp(
        max=batch.input_ids.shape[1] - 1
    )
    positions = positions.to(device)
    index = positions[..., None]
    logits = torch.gather(out.logits, 1, index.expand(-1, -1, out.logits.shape[-1])).float()
    logits = logits / temperature
    tokens = batch.tokens[rows].to(device)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1]
        states = torch.gather(hidden, 1, index.expand(-1, -1, hidden.shape[-1]))
        values = value_head(states.float())
    return logprobs.cpu(), values.cpu() if values is not None else None


def reference_logprobs(
    model: nn.Module,
    reference: nn.Module | None,
    batch: RolloutBatch,
    temperature: float,
    precision: Precision,
) -> torch.Tensor:
    """Log-probabilities of the responses under the frozen reference."""
    rows = torch.arange(len(batch))
    with torch.no_grad():
        if reference is not None:
            return policy_forward(reference, None, batch, rows, temperature, precision)[0]
        with model.disable_adapter():  # type: ignore[operator]
            return policy_forward(model, None, batch, rows, temperature, precision)[0]


def reference_for(config: RunConfig, model: nn.Module, precision: Precision) -> nn.Module | None:
    """The frozen reference (`model.load_reference`: method.referenceModel, else the start
    model) beside the policy; None: the PEFT policy with its adapter switched off serves as
    the start model, no second copy."""
    spec = config.spec
    assert isinstance(spec, AlignmentJobSpec)
    if spec.method.reference_model is None and hasattr(model, "disable_adapter"):
        return None
    return load_reference(config, precision).to(next(model.parameters()).device)


# ---------------------------------------------------------------- the recipe


def run(config: RunConfig) -> dict[str, Any]:
    """Align with PPO; returns the metrics written to metrics.json."""
    started = time.monotonic()
    spec = config.spec
    assert isinstance(spec, AlignmentJobSpec)
    if not trains_here():
        return {}
    training = spec.training
    beta = spec.method.beta if spec.method.beta is not None else 0.0
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    set_seed(training.seed)

    tokenizer = load_policy_tokenizer(config)
    template = resolve_chat_template(spec.model.chat_template, tokenizer)
    prompts, held_out = load_prompts(config, tokenizer, template)
    rewards = build_rewards(config, tokenizer)
    precision = policy_precision(config)
    model = load_policy(config, precision)
    disable_dropout(model)
    reference = reference_for(config, model, precision)
    value_head = ValueHead(int(model.config.hidden_size)).to(next(model.parameters()).device)
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = build_optimizer(config, params)
    modules = {"policy": model, "value_head": value_head}
    per_device = training.batch_size.per_device
    prompts_per_step = min(training.batch_size.global_ or per_device, len(prompts))
    total_steps = training.max_steps or max(
        1, math.ceil((training.epochs or 1.0) * len(prompts) / prompts_per_step)
    )
    sampling = Sampling.of(spec.generation, batch_size=per_device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    every = spec.checkpoint.every_steps or 1

    state: dict[str, Any] = {"rounds": []}
    resume = resume_point(config)
    if resume is not None:
        state = load_round(resume, modules, optimizer)
        log.info("resuming from %s (rollout step %d of %d)", resume, state["step"], total_steps)
    else:
        before, before_parts = held_out_reward(
            model, tokenizer, held_out, rewards, sampling, precision
        )
        state |= {"reward_before": before, "reward_components_before": before_parts}
        log.info("held-out reward before PPO: %.4f", before)

    reporter = ProgressReporter(out, config.name, config.namespace, config.metrics_port)
    engine = rollout_engine(config, model, tokenizer, precision)
    try:
        for step in range(len(state["rounds"]), total_steps):
            chosen = round_prompts(len(prompts), prompts_per_step, training.seed, step)
            batch_prompts = prompts.subset(chosen)
            engine.sync(model)
            groups = engine.generate(batch_prompts.ids, sampling, seed=training.seed * 7919 + step)
            grouped, parts = score(rewards, batch_prompts, groups)
            summary = ppo_step(
                model,
                value_head,
                reference,
                optimizer,
                config,
                [batch_prompts.ids[i] for i, g in enumerate(groups) for _ in g],
                [c for g in groups for c in g],
                [s for g in grouped for s in g],
                pad=pad,
                beta=beta,
                seed=training.seed * 7919 + step,
                precision=precision,
            )
            summary |= {
                "step": step + 1,
                "components": {name: mean(values) for name, values in parts.items()},
            }
            state["rounds"].append(summary)
            if (step + 1) % every == 0 or step + 1 == total_steps:
                path = save_round(
                    out / "checkpoints", step + 1, modules, optimizer, state, spec.checkpoint.keep
                )
                reporter.checkpoint(step + 1, path)
            reporter.update(
                step=step + 1,
                total_steps=total_steps,
                loss=summary["policy_loss"],
                steps_this_session=step + 1 - (state["step"] if resume else 0),
            )
            if (step + 1) % training.logging_every_steps == 0 or step + 1 == total_steps:
                log.info(
                    "step %d/%d: mean reward %.4f, kl %.4f, policy loss %.4f, value loss %.4f",
                    step + 1,
                    total_steps,
                    summary["reward_mean"],
                    summary["kl"],
                    summary["policy_loss"],
                    summary["value_loss"],
                )
    finally:
        engine.close()

    after, after_parts = held_out_reward(model, tokenizer, held_out, rewards, sampling, precision)
    log.info("held-out reward after PPO: %.4f", after)
    metrics: dict[str, Any] = {
        **round_metrics(state, after, after_parts),
        "resumed_from_step": state["step"] if resume is not None else None,
        "precision": precision.name,
        **weight_dtypes(model),
        "wall_time_seconds": round(time.monotonic() - started, 2),
    }
    final = export.save_final(model, tokenizer, template, out)
    publish(config, final, metrics, reporter, step=len(state["rounds"]))
    return metrics


def ppo_step(
    model: nn.Module,
    value_head: ValueHead,
    reference: nn.Module | None,
    optimizer: Any,
    config: RunConfig,
    prompt_ids: list[list[int]],
    completions: list[Completion],
    scores: list[float],
    *,
    pad: int,
    beta: float,
    seed: int,
    precision: Precision,
) -> dict[str, Any]:
    """One rollout batch: rewards, advantages, then ppo.epochs passes of minibatch updates."""
    spec = config.spec
    assert isinstance(spec, AlignmentJobSpec)
    ppo, training = spec.method.ppo, spec.training
    batch = RolloutBatch(prompt_ids, [c.token_ids for c in completions], pad)
    everything = torch.arange(len(batch))
    temperature = spec.generation.temperature or 1.0  # 0 (greedy) samples nothing to weigh
    with torch.no_grad():
        old_logprobs, old_values = policy_forward(
            model, value_head, batch, everything, temperature, precision
        )
        assert old_values is not None
        ref_logprobs = reference_logprobs(model, reference, batch, temperature, precision)
        token_rewards = kl_penalized_rewards(
            torch.tensor(scores), old_logprobs, ref_logprobs, batch.mask, beta
        )
        advantages, returns = gae(token_rewards, old_values, batch.mask, ppo.gamma, ppo.lam)
        advantages = whiten(advantages, batch.mask)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    rng = random.Random(seed)
    size = training.batch_size.per_device
    policy_losses, value_losses = [], []
    model.train()
    for _ in range(ppo.epochs):
        order = list(range(len(batch)))
        rng.shuffle(order)
        for start in range(0, len(order), size):
            rows = torch.tensor(order[start : start + size])
            logprobs, values = policy_forward(
                model, value_head, batch, rows, temperature, precision
            )
            assert values is not None
            mask = batch.mask[rows]
            policy_loss = clipped_policy_loss(
                logprobs, old_logprobs[rows], advantages[rows], mask, ppo.clip_range
            )
            value_loss = clipped_value_loss(
                values, old_values[rows], returns[rows], mask, ppo.value_clip_range
            )
            (policy_loss + ppo.value_loss_coef * value_loss).backward()
            if training.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            policy_losses.append(float(policy_loss.detach()))
            value_losses.append(float(value_loss.detach()))
    kl = float(((old_logprobs - ref_logprobs) * batch.mask).sum() / max(len(batch), 1))
    return {
        "reward_mean": mean(scores),
        "kl": kl,
        "policy_loss": mean(policy_losses),
        "value_loss": mean(value_losses),
        "response_length": float(batch.mask.sum(dim=1).mean()),
    }
