"""Rewards of the online methods (grpo, rloo, ppo, raft): a weighted sum of components.

Each `spec.method.rewards[]` entry becomes one component: a reward model (the output of a
reward-model job), a verifiable rule (exact match / contains / regex against the response
and a dataset column, a length penalty) or a user's Python function, imported here, inside
the trainer, never by the operator. Every component is reported separately, so reward
hacking (a learned reward rising while the rule-based one falls) is visible.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.api.kinds import AlignmentJobSpec, RewardFunction, RewardRule, RewardSource
from lmforge.api.runconfig import REWARD_FUNCTIONS_DIR, RunConfig

Messages = Sequence[dict[str, Any]]
# (prompts, completions, columns) -> one float per completion
ScoreFn = Callable[[Sequence[Messages], Sequence[str], dict[str, Sequence[Any]]], list[float]]

FUNCTIONS_DIR = Path(REWARD_FUNCTIONS_DIR)  # where a function's ConfigMap is mounted


class RewardError(Exception):
    """A reward component cannot be built or returned something unusable."""


@dataclass
class RewardComponent:
    name: str
    weight: float
    score: ScoreFn


@dataclass
class Rewards:
    """The summed reward and its parts."""

    components: list[RewardComponent] = field(default_factory=list)

    def __call__(
        self,
        prompts: Sequence[Messages],
        completions: Sequence[str],
        columns: dict[str, Sequence[Any]] | None = None,
    ) -> tuple[list[float], dict[str, list[float]]]:
        """(total reward per completion, each component's unweighted scores by name)."""
        columns = columns or {}
        parts: dict[str, list[float]] = {}
        total = [0.0] * len(completions)
        for component in self.components:
            scores = [float(s) for s in component.score(prompts, completions, columns)]
            if len(scores) != len(completions):
                raise RewardError(
                    f"reward {component.name} returned {len(scores)} scores for "
                    f"{len(completions)} completions"
                )
            parts[component.name] = scores
            total = [t + component.weight * s for t, s in zip(total, scores, strict=True)]
        return total, parts


def build_rewards(config: RunConfig, tokenizer: Any) -> Rewards:
    """The rewards of an online AlignmentJob; `tokenizer` is the policy's (length penalty)."""
    spec = config.spec
    assert isinstance(spec, AlignmentJobSpec)
    components = []
    for i, source in enumerate(spec.method.rewards):
        name = component_name(source, i)
        field_path = f"method.rewards[{i}]"
        if source.model is not None:
            score: ScoreFn = RewardModelScore(config.model_path(f"{field_path}.model"))
        elif source.rule is not None:
            score = rule_score(source.rule, tokenizer)
        else:
            assert source.function is not None
            score = function_score(source.function, field_path)
        components.append(RewardComponent(name, source.weight, score))
    return Rewards(components)


def component_name(source: RewardSource, index: int) -> str:
    """The name a component is logged under: its own, or kind-index (rule-exact-match-0)."""
    if source.name:
        return source.name
    if source.model is not None:
        return f"model-{index}"
    if source.rule is not None:
        return f"rule-{source.rule.type}-{index}"
    return f"function-{index}"


# ---------------------------------------------------------------- reward models


def reward_text(tokenizer: Any, prompt: Messages, completion: str) -> str:
    """The text a reward model scores: prompt and response rendered with the reward model's
    own chat template (plain concatenation without one), ending in EOS. The reward-model
    recipe trains on exactly this, so scores at rollout time mean what they meant in
    training."""
    messages = [*prompt, {"role": "assistant", "content": completion}]
    if getattr(tokenizer, "chat_template", None):
        text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    else:
        text = "".join(str(m.get("content", "")) for m in messages)
    eos = tokenizer.eos_token or ""
    return text if text.endswith(eos) else text + eos


class RewardModelScore:
    """Scores with a sequence-classification model (the final/ of a reward-model job)."""

    def __init__(self, path: str, batch_size: int = 16) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if torch.cuda.is_available():
            self.model = self.model.to("cuda")
        self.batch_size = batch_size

    def __call__(
        self,
        prompts: Sequence[Messages],
        completions: Sequence[str],
        columns: dict[str, Sequence[Any]],
    ) -> list[float]:
        texts = [
            reward_text(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)
        ]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,  # the chat template and EOS are in the text already
            ).to(self.model.device)
            with self.torch.no_grad():
                logits = self.model(**batch).logits
            scores += [float(x) for x in logits[:, 0]]
        return scores


# ---------------------------------------------------------------- rules


def _normalise(text: str) -> str:
    return " ".join(str(text).split()).lower()


def rule_score(rule: RewardRule, tokenizer: Any) -> ScoreFn:
    """A verifiable reward: 1.0 / 0.0 for the matching rules, <= 0 for the length penalty."""
    if rule.type == "length-penalty":
        target = rule.target_length

        def length_penalty(prompts: Any, completions: Sequence[str], columns: Any) -> list[float]:
            lengths = [
                len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions
            ]
            return [-max(0, n - target) / target for n in lengths]

        return length_penalty
    if rule.type == "regex":
        assert rule.pattern is not None
        pattern = re.compile(rule.pattern)
        return lambda prompts, completions, columns: [
            1.0 if pattern.search(c) else 0.0 for c in completions
        ]
    column = rule.column
    assert column is not None

    def against_column(
        prompts: Any, completions: Sequence[str], columns: dict[str, Sequence[Any]]
    ) -> list[float]:
        if column not in columns:
            raise RewardError(
                f"rule {rule.type} reads dataset column {column!r}, which the prompts do not "
                f"have (columns: {', '.join(sorted(columns)) or 'none'})"
            )
        answers = [_normalise(a) for a in columns[column]]
        got = [_normalise(c) for c in completions]
        if rule.type == "exact-match":
            return [1.0 if g == a else 0.0 for g, a in zip(got, answers, strict=True)]
        return [1.0 if a in g else 0.0 for g, a in zip(got, answers, strict=True)]

    return against_column


# ---------------------------------------------------------------- user functions


def function_score(function: RewardFunction, field_path: str) -> ScoreFn:
    """Import `module:function` from the function's directory (a local path or PVC path
    resolved in the run config, or its mounted ConfigMap)."""
    module_name, _, attr = function.function.partition(":")
    folder = Path(function.path) if function.path else None
    if function.config_map:
        folder = FUNCTIONS_DIR / function.config_map
    if folder is not None:
        if not folder.is_dir():
            raise RewardError(f"spec.{field_path}.function: {folder} is not a directory")
        sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise RewardError(
            f"spec.{field_path}.function: cannot import {function.function}: {err}"
        ) from None
    finally:
        if folder is not None:
            sys.path.remove(str(folder))

    def call(
        prompts: Sequence[Messages], completions: Sequence[str], columns: dict[str, Sequence[Any]]
    ) -> list[float]:
        return list(fn(prompts=list(prompts), completions=list(completions), **columns))

    return call
