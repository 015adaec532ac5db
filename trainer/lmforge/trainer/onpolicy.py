"""What our own online recipes (raft, ppo) share: the prompts and their reward columns, the
held-out reward, and round checkpoints (policy weights, optimizer, round, RNG, history) that
appear atomically and are resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lmforge.trainer import checkpoints
from lmforge.trainer.data import Example, encode_prompt, load_examples
from lmforge.trainer.launch import rank
from lmforge.trainer.model import Precision
from lmforge.trainer.policy import load_trainable_state, trainable_state
from lmforge.trainer.rewards import Rewards
from lmforge.trainer.rollouts import Completion, Sampling, generate, ray_role, serve_as_ray_worker
from safetensors.torch import load_file, save_file

from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)

Messages = tuple[dict[str, str], ...]


@dataclass
class Prompts:
    """Prompts (as messages and as token ids) with the dataset columns rewards read."""

    messages: list[Messages] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.messages)

    def subset(self, indices: Sequence[int]) -> Prompts:
        return Prompts(
            [self.messages[i] for i in indices],
            [self.ids[i] for i in indices],
            {k: [v[i] for i in indices] for k, v in self.columns.items()},
        )


def prompt_messages(example: Example) -> Messages:
    """The conversation a response is generated for: everything before the last assistant
    turn (prompt records have none)."""
    turns = example.messages
    while turns and turns[-1].get("role") == "assistant":
        turns = turns[:-1]
    return turns


def build_prompts(examples: Sequence[Example], tokenizer: Any, template: str | None) -> Prompts:
    """Prompts rendered as training renders them; columns are the records' extra fields (a
    column a record lacks is None), plus `reference` when a record carries an answer."""
    prompts = Prompts()
    names = sorted({name for e in examples for name in e.columns})
    prompts.columns = {name: [e.columns.get(name) for e in examples] for name in names}
    if any(e.reference is not None for e in examples):
        prompts.columns.setdefault("reference", [e.reference for e in examples])
    for example in examples:
        messages = prompt_messages(example)
        prompts.messages.append(messages)
        prompts.ids.append(encode_prompt(messages, tokenizer, template))
    return prompts


def load_prompts(
    config: RunConfig, tokenizer: Any, template: str | None
) -> tuple[Prompts, Prompts]:
    """(train, held-out) prompts of the run's dataset."""
    spec = config.spec
    train, held_out = load_examples(
        spec.dataset, Path(config.paths.data or "."), seed=spec.training.seed
    )
    held_out = held_out[: spec.evaluation.max_samples]
    return build_prompts(train, tokenizer, template), build_prompts(held_out, tokenizer, template)


def round_prompts(count: int, per_round: int | None, seed: int, index: int) -> list[int]:
    """Which prompts round `index` samples: all of them, or `per_round` drawn anew each round."""
    if per_round is None or per_round >= count:
        return list(range(count))
    return sorted(random.Random(f"round/{seed}/{index}").sample(range(count), per_round))


def score(
    rewards: Rewards, prompts: Prompts, groups: Sequence[Sequence[Completion]]
) -> tuple[list[list[float]], dict[str, list[float]]]:
    """Rewards of every completion, grouped like `groups`, and each component's flat scores."""
    flat = [(c.prompt_index, c) for group in groups for c in group]
    total, parts = rewards(
        [prompts.messages[i] for i, _ in flat],
        [c.text for _, c in flat],
        {k: [v[i] for i, _ in flat] for k, v in prompts.columns.items()},
    )
    grouped, cursor = [], 0
    for group in groups:
        grouped.append(total[cursor : cursor + len(group)])
        cursor += len(group)
    return grouped, parts


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def held_out_reward(
    model: Any,
    tokenizer: Any,
    prompts: Prompts,
    rewards: Rewards,
    sampling: Sampling,
    precision: Precision,
) -> tuple[float, dict[str, float]]:
    """Mean reward of greedy responses to the held-out prompts (generated under the run's
    precision, as the rollouts are), and each component's mean."""
    if not len(prompts):
        return float("nan"), {}
    groups = generate(model, tokenizer, prompts.ids, sampling.greedy(), seed=0, precision=precision)
    totals, parts = score(rewards, prompts, groups)
    return mean([t for group in totals for t in group]), {k: mean(v) for k, v in parts.items()}


# ---------------------------------------------------------------- round checkpoints

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


def save_round(
    checkpoints_dir: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Checkpoint after `step` rounds (or rollout steps): the trainable weights of every module
    (`<name>.safetensors`), the optimizer, the RNG and `state`; published atomically."""
    staged = checkpoints_dir / checkpoints.STAGING / f"{checkpoints.PREFIX}{step}"
    staged.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        save_file(
            {k: v.contiguous() for k, v in trainable_state(module).items()},
            str(staged / f"{name}.safetensors"),
        )
    torch.save(optimizer.state_dict(), staged / OPTIMIZER_FILE)
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, staged / RNG_FILE)
    (staged / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
    published = checkpoints.publish(staged, checkpoints_dir)
    checkpoints.prune(checkpoints_dir, keep)
    return published


def load_round(
    checkpoint: Path, modules: dict[str, torch.nn.Module], optimizer: Any
) -> dict[str, Any]:
    """Restore what `save_round` wrote into `modules` and `optimizer`; returns the state."""
    for name, module in modules.items():
        load_trainable_state(module, load_file(str(checkpoint / f"{name}.safetensors")))
    optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True))
    rng = torch.load(checkpoint / RNG_FILE, weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    state: dict[str, Any] = json.loads((checkpoint / STATE_FILE).read_text())
    return state


def resume_point(config: RunConfig) -> Path | None:
    """The latest complete checkpoint to continue from (checkpoint.resume auto), else None."""
    checkpoints_dir = config.output_dir / "checkpoints"
    checkpoints.clear_staging(checkpoints_dir)
    if config.spec.checkpoint.resume != "auto":
        return None
    return checkpoints.latest_complete_checkpoint(checkpoints_dir)


def round_metrics(
    state: dict[str, Any], after: float, after_parts: dict[str, float]
) -> dict[str, Any]:
    """What a round-based run (RAFT rounds, PPO rollout steps) reports: held-out reward
    before and after, each reward component on its own, and every round's summary."""
    return {
        "reward_before": state["reward_before"],
        "reward_after": after,
        **{f"reward_before/{k}": v for k, v in state["reward_components_before"].items()},
        **{f"reward_after/{k}": v for k, v in after_parts.items()},
        "rounds": state["rounds"],
        "round_rewards": [r["reward_mean"] for r in state["rounds"]],
        "steps": len(state["rounds"]),
    }


def trains_here() -> bool:
    """Whether this process runs the rounds: rank 0 of the head node. Another node of the
    job hosts rollout workers until the head is done; other local ranks have nothing to do."""
    role = ray_role(os.environ)
    if role.role == "worker":
        serve_as_ray_worker(role)
        return False
    return role.role != "idle" and rank() == 0
