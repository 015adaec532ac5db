"""A user reward function for the tiny "spell the digits" task (AlignmentJob rewards[].function).

LMForge imports it inside the trainer only, calling it with the prompts, the sampled
completions and the prompt records' columns (here `answer`, the right spelling) as lists.
"""

from __future__ import annotations

from typing import Any


def word_accuracy(
    prompts: list[Any], completions: list[str], answer: list[str], **columns: Any
) -> list[float]:
    """Per response: the share of words in the right place, over the longer of response and
    answer (so missing and extra words both cost). 1.0 for the exact answer."""
    scores = []
    for completion, reference in zip(completions, answer, strict=True):
        got, want = completion.lower().split(), str(reference).lower().split()
        right = sum(g == w for g, w in zip(got, want, strict=False))
        scores.append(right / max(len(got), len(want), 1))
    return scores
