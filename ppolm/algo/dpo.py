"""Preference losses on sequence log-probs (pure functions): DPO and IPO.

With the implicit reward of a completion, r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), and the log-ratio
margin of a pair

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)),

  sigmoid  DPO (Rafailov et al. 2023, eq. 7):   L = -log sigmoid(beta h);
           with label_smoothing eps (conservative DPO: each label is wrong with probability eps)
                                                L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
  ipo      IPO (Azar et al. 2023, eq. 17):      L = (h - 1 / (2 beta))^2,  beta being the paper's tau.

DPO's loss keeps falling as h grows, so on separable pairs it drives h (and the policy's distance from the
reference) without bound; IPO regresses h onto the fixed target 1/(2 beta) instead. What the log-probs are is
the caller's choice: DPO uses sums over the completion's tokens (the log-probability of the sequence); for IPO
ppolm passes per-token means (`sequence_logprobs(..., average=True)`), as TRL does, so that the target 1/(2 beta)
means the same margin for a 3-token and a 300-token completion (with sums, h grows with length while the
target does not, and long pairs would be pushed past it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprobs(logprobs: torch.Tensor, completion_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-row log-prob of the completion: the sum of logprobs where completion_mask is 1, or (average) that sum
    over the number of completion tokens. logprobs, completion_mask (B, T) -> (B,) fp32. Masked positions do not
    count whatever they hold (prompt and padding)."""
    mask = completion_mask.float()
    total = (logprobs.float() * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO or IPO loss of each pair (module docstring), and the implicit rewards.

    policy_chosen_logps, policy_rejected_logps (B,): log pi of the chosen / rejected completion (with grad).
    ref_chosen_logps, ref_rejected_logps (B,): the same under the frozen reference (no grad needed).
    -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), fp32. The losses are per pair: the caller
    averages them over its batch (ppolm: over the optimizer step's pairs, every micro-batch and process).
    The rewards beta * (log pi - log pi_ref) are detached (metrics: their difference is beta h).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss only")
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
