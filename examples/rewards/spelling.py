"""A user reward function for the tiny "spell the digits" task (method.rewards[].function).

LMForge imports `spelling:word_accuracy` inside the trainer (never in the operator) and calls it
with the prompts, the responses and the dataset's columns as keyword lists.
"""

from __future__ import annotations

from typing import Any


def word_accuracy(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """Share of the reference's words the response has in the right place (a dense reward:
    "four zero seven" for "four one seven" scores 2/3; extra or missing words count against)."""
    scores = []
    for response, reference in zip(completions, answer, strict=True):
        got, want = response.lower().split(), reference.lower().split()
        right = sum(g == w for g, w in zip(got, want, strict=False))
        scores.append(right / max(len(got), len(want), 1))
    return scores
