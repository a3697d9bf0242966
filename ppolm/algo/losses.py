"""PPO losses as pure functions. Shapes: B batch, R response length; all maths in fp32."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppolm.algo.aggregation import agg_loss
from ppolm.ops import kl_estimate, masked_mean, masked_sum


def token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | None) -> torch.Tensor:
    """masked mean, or sum / num_tokens when the caller knows the token count of the whole minibatch.

    Dividing every micro-batch (and every process) by the same global count makes gradient accumulation and
    data parallelism give exactly the gradient of the full-minibatch token mean.
    """
    return masked_mean(x, mask) if num_tokens is None else masked_sum(x, mask) / max(num_tokens, 1.0)


@dataclass(frozen=True)
class PolicyLossOut:
    """loss: scalar; clipfrac: fraction of tokens where the clipped branch was taken; approx_kl: k3 of old||new."""

    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float,
    log_ratio_clamp: float = 20.0,
    norm: float | None = None,
    agg: str = "token_mean",
    clip_eps_high: float | None = None,
) -> PolicyLossOut:
    """Clipped surrogate (Schulman et al. 2017):

    ratio = exp(logprobs - old_logprobs)
    L = agg( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)) )  over response tokens,
    agg the `loss.agg` aggregation (token mean by default; ppolm.algo.aggregation), norm its normaliser for the
    whole minibatch (None: these rows'). The log-ratio is clamped to +-log_ratio_clamp before exp() so one bad
    token cannot overflow the loss. eps_high = clip_eps_high, or clip_eps when None (DAPO's "clip-higher" sets it
    above eps; ppolm.algo.policy_losses). Inputs (B, R); returns scalar loss and diagnostics (no grad in the
    diagnostics, which are token means whatever agg is).
    """
    log_ratio = (logprobs.float() - old_logprobs.float()).clamp(-log_ratio_clamp, log_ratio_clamp)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    return clipped_surrogate(torch.exp(log_ratio), log_ratio, advantages, response_mask, clip_eps, high, agg, norm)


def clipped_surrogate(ratio: torch.Tensor, log_ratio: torch.Tensor, advantages: torch.Tensor,
                      response_mask: torch.Tensor, low: float, high: float, agg: str, norm: float | None) -> PolicyLossOut:
    """agg( max(-A * ratio, -A * clip(ratio, 1 - low, 1 + high)) ) and its diagnostics, for a token ratio (PPO) or a
    sequence ratio broadcast over its tokens (GSPO). log_ratio: the token log-ratios (for approx_kl). All (B, R)."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    loss = agg_loss(torch.maximum(unclipped, clipped), response_mask, agg, norm)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), response_mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask)
        ratio_mean = masked_mean(ratio, response_mask)
    return PolicyLossOut(loss, clipfrac, approx_kl, ratio_mean)


@dataclass(frozen=True)
class ValueLossOut:
    """loss: scalar (already halved); clipfrac: fraction of tokens where the clipped value loss was larger."""

    loss: torch.Tensor
    clipfrac: torch.Tensor


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float | None,
    num_tokens: float | None = None,
) -> ValueLossOut:
    """Clipped value loss (as in OpenAI baselines / the N+ RLHF details):

    V_clip = old_values + clip(values - old_values, -eps, eps)
    L = 0.5 * mean( max((values - returns)^2, (V_clip - returns)^2) ); clip_eps=None disables clipping.
    """
    values = values.float()
    err = (values - returns) ** 2
    if clip_eps is None:
        return ValueLossOut(0.5 * token_mean(err, response_mask, num_tokens), torch.zeros((), device=values.device))
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(err, err_clipped), response_mask, num_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).float(), response_mask)
    return ValueLossOut(loss, clipfrac)


def entropy_bonus(entropy: torch.Tensor, response_mask: torch.Tensor, norm: float | None = None,
                  agg: str = "token_mean") -> torch.Tensor:
    """Per-token entropy over response tokens, aggregated like the policy loss (`agg`, `norm` as in
    policy_loss); the loss subtracts ent_coef times this."""
    return agg_loss(entropy, response_mask, agg, norm)


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "k3",
    norm: float | None = None,
    agg: str = "token_mean",
) -> torch.Tensor:
    """KL to the reference as a loss term (GRPO, Shao et al. 2024 eq. 4 uses k3): kl_estimate(logprobs,
    ref_logprobs) over response tokens, aggregated like the policy loss (`agg`, `norm` as in policy_loss: GRPO
    puts it inside the same per-response mean); the gradient flows through logprobs. (B, R) each -> scalar; the
    loss adds kl_coef times this (`kl.in: loss`). k1 is refused there by the config: E_pi[grad log pi] = 0, so a
    k1 term has no gradient in expectation."""
    return agg_loss(kl_estimate(logprobs, ref_logprobs, estimator), response_mask, agg, norm)


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Negative log-likelihood per completion token: -mean(logprobs) over loss_mask. (B, T) -> scalar."""
    return -token_mean(logprobs.float(), loss_mask, num_tokens)


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), mean over pairs. (B,), (B,) -> scalar."""
    return -torch.nn.functional.logsigmoid(chosen_scores.float() - rejected_scores.float()).mean()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over response tokens (1 = perfect critic, <= 0 = useless)."""
    from ppolm.ops import masked_var

    var_returns = masked_var(returns, response_mask)
    return 1.0 - masked_var(returns - values, response_mask) / var_returns.clamp(min=1e-8)
