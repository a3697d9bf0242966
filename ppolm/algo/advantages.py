"""Advantage estimation: reward shaping with the KL penalty, then GAE.

Shapes: B batch, R response length. `response_mask` is 1.0 on response tokens (up to and including EOS).
"""

from __future__ import annotations

import torch

from ppolm.ops import kl_estimate


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last response token per row, (B, R) -> (B,); a row with no token gives 0."""
    lengths = response_mask.sum(-1).long()
    return (lengths - 1).clamp(min=0)


def shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -kl_coef * KL_t, plus the sequence score at the last response token.

    InstructGPT / Ziegler et al. 2019: the reward model's score is given once, at the final token, and every
    token pays the KL penalty to the reference. scores (B,), logprobs/ref_logprobs/response_mask (B, R).
    Returns (rewards (B, R), kl (B, R)), both zero on padding.
    """
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * response_mask
    rewards = -kl_coef * kl
    idx = last_token_index(response_mask)
    has_tokens = (response_mask.sum(-1) > 0).to(rewards.dtype)
    rewards = rewards.scatter_add(1, idx.unsqueeze(1), (scores.float() * has_tokens).unsqueeze(1))
    return rewards * response_mask, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over response tokens.

    TD error  delta_t = r_t + gamma * V_{t+1} - V_t   (V after the last real token is 0: the episode ends)
    advantage A_t = delta_t + gamma * lam * A_{t+1}
    returns   G_t = A_t + V_t  (the value target)
    rewards, values, response_mask: (B, R) -> (advantages (B, R), returns (B, R)), zero on padding.
    Responses are right-padded, so masking V_{t+1} and A_{t+1} by the next position's mask ends each episode.
    """
    rewards, values, mask = rewards.float(), values.float(), response_mask.float()
    B, R = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_adv)
    for t in reversed(range(R)):
        next_mask = mask[:, t + 1] if t + 1 < R else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        adv_t = delta + gamma * lam * next_adv * next_mask
        advantages[:, t] = adv_t * mask[:, t]
        next_adv, next_value = advantages[:, t], values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns
