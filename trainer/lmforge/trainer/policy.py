"""The policy of our own online recipes (raft, ppo): loading it, its optimizer, and moving its
trainable weights around (to rollout workers, into and out of round checkpoints).

Only the trainable parameters change during training (all of them for full fine-tuning, the
adapter for LoRA), so they are all a rollout worker or a checkpoint needs next to the base
model both can load from disk.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lmforge.trainer.model import (
    MethodError,
    Precision,
    apply_method,
    load_model,
    load_tokenizer,
    resolve_precision,
)

from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)


def policy_precision(config: RunConfig) -> Precision:
    """The run's precision: raft and ppo autocast their training forwards to bf16 where it
    resolves to bf16. Their loops scale no fp16 loss, so fp16 trains in fp32."""
    precision = resolve_precision(config.spec.training.precision)
    if precision.name != "fp16":
        return precision
    log.warning(
        "training.precision fp16: %s trains in fp32 (no loss scaling)", config.spec.objective
    )
    return Precision("fp32")


def load_policy(config: RunConfig, precision: Precision) -> torch.nn.Module:
    """The base model of the run with its tuning method applied (full, lora, ...), its
    weights in what `precision` (`policy_precision`) keeps them in."""
    spec = config.spec
    model = load_model(
        config.paths.model,
        method=spec.tuning,
        training=spec.training,
        strategy=spec.distributed.strategy,
        precision=precision,
        trust_remote_code=spec.model.trust_remote_code,
    )
    if torch.cuda.is_available():
        model = model.to("cuda")
    return apply_method(model, spec.tuning, total_steps=1)


def load_policy_tokenizer(config: RunConfig) -> Any:
    """The policy's tokenizer, padding on the left (generation appends on the right)."""
    tokenizer = load_tokenizer(config.paths.model, config.spec.model.trust_remote_code)
    tokenizer.padding_side = "left"
    return tokenizer


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached on the CPU."""
    return {
        name: p.detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from `trainable_state` of the same kind of policy) into `model`."""
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise ValueError(f"policy has no parameters {', '.join(missing[:5])}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))


def build_optimizer(config: RunConfig, parameters: list[torch.nn.Parameter]) -> Any:
    """The run's optimizer over `parameters` (raft and ppo step it themselves)."""
    training = config.spec.training
    if training.optimizer == "adamw":
        return torch.optim.AdamW(
            parameters, lr=training.learning_rate, weight_decay=training.weight_decay
        )
    if training.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=training.learning_rate, weight_decay=training.weight_decay
        )
    raise MethodError(
        f"training.optimizer {training.optimizer}: {config.spec.objective} supports adamw or sgd"
    )
