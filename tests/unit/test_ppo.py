"""PPO's objective against hand-computed values (the numbers in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
from lmforge.trainer.recipes.ppo import (
    RolloutBatch,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_penalized_rewards,
    whiten,
)


def close(actual: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=1e-5, rtol=0)


def test_gae_by_hand() -> None:
    # gamma = lam = 0.5; row 0: r = [1, 0, 2], V = [0.5, 1, 1.5]
    #   t2: delta = 2 - 1.5 = 0.5                          A = 0.5
    #   t1: delta = 0 + 0.5 * 1.5 - 1 = -0.25              A = -0.25 + 0.25 * 0.5 = -0.125
    #   t0: delta = 1 + 0.5 * 1 - 0.5 = 1                  A = 1 + 0.25 * -0.125 = 0.96875
    # row 1: r = [0, 1, (5)], V = [2, 0.5, (9)], last token masked (the response ended):
    #   t1: delta = 1 + 0 - 0.5 = 0.5                      A = 0.5
    #   t0: delta = 0 + 0.5 * 0.5 - 2 = -1.75              A = -1.75 + 0.25 * 0.5 = -1.625
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    close(advantages, [[0.96875, -0.125, 0.5], [-1.625, 0.5, 0.0]])
    close(returns, [[1.46875, 0.875, 2.0], [0.375, 1.0, 0.0]])


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.0, 0.0, 3.0]])
    values = torch.tensor([[1.0, 2.0, 0.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(advantages, [[2.0, 1.0, 2.5]])
    close(returns, [[3.0, 3.0, 3.0]])


def test_clipped_policy_loss_by_hand() -> None:
    # ratios 1.5, 0.5, 1.1, (9 masked); advantages 1, 1, -2; eps 0.2
    #   max(-1 * 1.5, -1 * 1.2) = -1.2;  max(-0.5, -0.8) = -0.5;  max(2.2, 2.2) = 2.2
    #   mean = 0.5 / 3
    ratios = torch.tensor([[1.5, 0.5, 1.1, 9.0]])
    advantages = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss = clipped_policy_loss(torch.log(ratios), torch.zeros(1, 4), advantages, mask, 0.2)
    assert float(loss) == pytest.approx(0.5 / 3)


def test_clipped_policy_loss_gradient_vanishes_outside_the_trust_region() -> None:
    logprobs = torch.log(torch.tensor([[1.5, 0.9]])).requires_grad_(True)
    loss = clipped_policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)
    loss.backward()
    assert logprobs.grad is not None
    assert logprobs.grad[0, 0] == 0  # ratio 1.5 > 1.2 with a positive advantage: clipped
    assert logprobs.grad[0, 1] == pytest.approx(-0.9 / 2)  # d(-r)/dlogp = -r, mean over 2


def test_clipped_value_loss_by_hand() -> None:
    # V = [1, 0], V_old = [0.5, 0.5], R = [2, 0], clip 0.2
    #   token 0: V_clipped = 0.7: max((1-2)^2, (0.7-2)^2) = 1.69
    #   token 1: V_clipped = 0.3: max(0, 0.09) = 0.09;  0.5 * mean = 0.445
    values = torch.tensor([[1.0, 0.0, 7.0]])
    old = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert float(clipped_value_loss(values, old, returns, mask, 0.2)) == pytest.approx(0.445)


def test_kl_penalty_on_every_token_and_score_on_the_last() -> None:
    # beta 0.1: -0.1 * (-1 - -1.5) = -0.05;  -0.1 * (-2 - -1) = 0.1, plus the score 1
    rewards = kl_penalized_rewards(
        torch.tensor([1.0]),
        torch.tensor([[-1.0, -2.0, 0.0]]),
        torch.tensor([[-1.5, -1.0, 3.0]]),
        torch.tensor([[1.0, 1.0, 0.0]]),
        beta=0.1,
    )
    close(rewards, [[-0.05, 1.1, 0.0]])


def test_whiten_uses_only_unmasked_entries() -> None:
    out = whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    close(out, [[-1.0, 1.0, 0.0]])


def test_rollout_batch_places_responses_after_their_prompts() -> None:
    batch = RolloutBatch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.tokens.tolist() == [[1, 2, 0], [3, 4, 9]]
    assert batch.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.start.tolist() == [3, 1]
    assert not math.isnan(float(batch.mask.sum()))
