"""Reward components of the online methods: rules, user functions, the weighted sum."""

from __future__ import annotations

from pathlib import Path

import pytest
from lmforge.trainer.rewards import (
    RewardComponent,
    RewardError,
    Rewards,
    function_score,
    reward_text,
    rule_score,
)
from lmforge.trainer.tiny import build_tokenizer, bundled_texts

from lmforge.api.kinds import RewardFunction, RewardRule

PROMPTS = [[{"role": "user", "content": "spell: 1 2"}]] * 3
COMPLETIONS = ["one two", "One  two!", "one three"]
COLUMNS = {"answer": ["one two", "one two", "one two"]}


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return build_tokenizer(bundled_texts())


def test_exact_match_and_contains_read_the_reference_column(tokenizer) -> None:  # type: ignore[no-untyped-def]
    exact = rule_score(RewardRule(type="exact-match", column="answer"), tokenizer)
    assert exact(PROMPTS, ["one two", " One  TWO ", "one three"], COLUMNS) == [1.0, 1.0, 0.0]
    contains = rule_score(RewardRule(type="contains", column="answer"), tokenizer)
    assert contains(PROMPTS, ["so: one two.", "two one", "one two three"], COLUMNS) == [
        1.0,
        0.0,
        1.0,
    ]
    with pytest.raises(RewardError, match=r"column 'reference'.*columns: answer"):
        rule_score(RewardRule(type="exact-match", column="reference"), tokenizer)(
            PROMPTS, COMPLETIONS, COLUMNS
        )


def test_regex_and_length_penalty(tokenizer) -> None:  # type: ignore[no-untyped-def]
    regex = rule_score(RewardRule(type="regex", pattern=r"^(\w+ ?)+$"), tokenizer)
    assert regex(PROMPTS, COMPLETIONS, {}) == [1.0, 0.0, 1.0]
    short = "one"
    long = " ".join(["seven"] * 40)
    n_long = len(tokenizer(long, add_special_tokens=False)["input_ids"])
    penalty = rule_score(RewardRule(type="length-penalty", target_length=10), tokenizer)
    assert penalty(PROMPTS[:2], [short, long], {}) == [0.0, -(n_long - 10) / 10]


def test_user_function_is_imported_from_its_folder(tmp_path: Path) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, answer):\n"
        "    return [1.0 / (1 + len(c)) + (a in c) for c, a in zip(completions, answer)]\n"
    )
    score = function_score(
        RewardFunction(function="my_rewards:brevity", path=str(tmp_path)), "method.rewards[0]"
    )
    assert score(PROMPTS, ["one two", "x", "y"], COLUMNS) == [1.0 + 1 / 8, 0.5, 0.5]
    with pytest.raises(RewardError, match=r"spec.method.rewards\[1\].function: cannot import"):
        function_score(
            RewardFunction(function="my_rewards:missing", path=str(tmp_path)), "method.rewards[1]"
        )


def test_rewards_sum_by_weight_and_report_each_component() -> None:
    rewards = Rewards(
        [
            RewardComponent("right", 1.0, lambda p, c, cols: [1.0, 0.0, 1.0]),
            RewardComponent("short", 0.5, lambda p, c, cols: [-2.0, 0.0, 0.0]),
        ]
    )
    total, parts = rewards(PROMPTS, COMPLETIONS)
    assert total == [0.0, 0.0, 1.0]
    assert parts == {"right": [1.0, 0.0, 1.0], "short": [-2.0, 0.0, 0.0]}
    broken = Rewards([RewardComponent("bad", 1.0, lambda p, c, cols: [1.0])])
    with pytest.raises(RewardError, match="bad returned 1 scores for 3 completions"):
        broken(PROMPTS, COMPLETIONS)


def test_reward_text_uses_the_chat_template_and_ends_in_eos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = reward_text(tokenizer, PROMPTS[0], "one two")
    assert text.endswith(tokenizer.eos_token)
    assert "spell: 1 2" in text and "one two" in text
    assert text.count(tokenizer.eos_token) >= 1
