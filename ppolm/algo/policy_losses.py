"""Policy-loss variants, selected by name (`algo.policy_loss`): pure functions with one signature.

Shapes: B rows (responses), R response length. Every function takes logprobs, old_logprobs, advantages and
response_mask (B, R), the clip range as two epsilons (clip_low, clip_high: the ratio is kept in
[1 - clip_low, 1 + clip_high]), log_ratio_clamp, and the aggregation `agg` with its minibatch normaliser `norm`
(ppolm.algo.aggregation): each builds a (B, R) matrix of per-token loss terms and hands it to `agg_loss`, so
gradient accumulation over micro-batches and processes stays exact for every variant.

| name  | ratio                              | what is clipped                 | loss.agg null        | source        |
| ----- | ---------------------------------- | ------------------------------- | -------------------- | ------------- |
| ppo   | per token, pi / pi_old             | the surrogate (min with clip)   | the estimator's      | Schulman 2017 |
| gspo  | per response, geometric mean       | the surrogate, once a response  | seq_mean_token_mean  | Zheng 2025    |
| cispo | per token                          | the IS weight (stop-gradient)   | token_mean           | MiniMax 2025  |

Clip defaults (`algo.clip_eps_low` / `algo.clip_eps_high` null): ppo uses `ppo.clip_eps` on both sides (DAPO's
clip-higher is `algo.clip_eps_high: 0.28` with 0.2 below, Yu et al. 2025 and verl's DAPO recipe); gspo 3e-4 /
4e-4 (Zheng et al. 2025 set "the clipping ranges in Equation (5) to 3e-4 and 4e-4"); cispo no lower bound
(clip_low 1.0, so the weight is only kept >= 0: MiniMax-M1 sets eps_low^IS large and tunes eps_high^IS alone) and
an upper weight cap of 4 (clip_high 3.0): no value of eps_high^IS was found in the MiniMax-M1 text; 4.0 is the
default of Tinker's CISPO loss (whose docs cite MiniMax-M1 and ScaleRL, Khatri et al. 2025).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ppolm.algo.aggregation import agg_loss
from ppolm.algo.losses import PolicyLossOut, clipped_surrogate, policy_loss
from ppolm.ops import masked_mean


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             response_mask: torch.Tensor, *, clip_low: float, clip_high: float, log_ratio_clamp: float = 20.0,
             norm: float | None = None, agg: str = "token_mean") -> PolicyLossOut:
    """The clipped surrogate of `ppolm.algo.losses.policy_loss` with DAPO's decoupled clip range (Yu et al. 2025,
    "clip-higher"): ratio clipped to [1 - clip_low, 1 + clip_high]. (B, R) each -> scalar."""
    return policy_loss(logprobs, old_logprobs, advantages, response_mask, clip_low, log_ratio_clamp, norm=norm,
                       agg=agg, clip_eps_high=clip_high)


def gspo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              response_mask: torch.Tensor, *, clip_low: float, clip_high: float, log_ratio_clamp: float = 20.0,
              norm: float | None = None, agg: str = "seq_mean_token_mean") -> PolicyLossOut:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"), in the form of its GSPO-token variant:

    s_i     = exp( 1/|y_i| sum_t log(pi / pi_old)_it )               the sequence ratio, (B,)
    s_it    = sg[s_i] * pi_it / sg[pi_it]                              equal to s_i, gradient s_i grad log pi_it
    L       = agg( max(-A_it * s_it, -A_it * clip(s_it, 1 - clip_low, 1 + clip_high)) )

    With one advantage per response (grpo, rloo, dr_grpo) every token of row i holds the same term, and with
    agg = seq_mean_token_mean (1/B' sum_i 1/|y_i| sum_t) the loss and its gradient are exactly eq. 5's
    1/G sum_i min(s_i A_i, clip(s_i) A_i): one ratio and one clip decision per response, each response weighed
    alike. With token-level advantages (gae, reinforce_pp) it is GSPO-token: the ratio and the clip stay per
    response, the advantage per token. The config keeps agg = seq_mean_token_mean (another aggregation would
    weigh responses by their length, which the paper's objective does not). Token log-ratios are clamped to
    +-log_ratio_clamp before the mean. (B, R) each -> scalar; diagnostics are token means (ratio_mean: of s_i).
    """
    mask = response_mask.float()
    log_ratio = (logprobs.float() - old_logprobs.float()).clamp(-log_ratio_clamp, log_ratio_clamp)
    seq_log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
    lp = logprobs.float()
    seq_ratio = torch.exp(lp - lp.detach() + seq_log_ratio.detach().unsqueeze(-1))  # (B, R), value s_i per row
    return clipped_surrogate(seq_ratio, log_ratio, advantages, response_mask, clip_low, clip_high, agg, norm)


def cispo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               response_mask: torch.Tensor, *, clip_low: float, clip_high: float, log_ratio_clamp: float = 20.0,
               norm: float | None = None, agg: str = "token_mean") -> PolicyLossOut:
    """CISPO (MiniMax 2025, "MiniMax-M1", eq. 4-5): clip the importance-sampling weight, not the update.

    r_it = pi / pi_old,   w_it = sg[ clip(r_it, 1 - clip_low, 1 + clip_high) ]
    L    = agg( -w_it * A_it * log pi_it )

    The gradient of every token is w_it A_it grad log pi_it: a clipped weight bounds a token's step, but no token
    leaves the gradient (PPO's min() zeroes the gradient of a token whose ratio left the range). The paper
    normalises by the group's token count (agg = token_mean, its default here). The loss value contains log pi,
    so it is not comparable with ppo's surrogate; its gradient is the point. (B, R) each -> scalar; clipfrac is
    the share of tokens whose weight was clipped.
    """
    log_ratio = (logprobs.float() - old_logprobs.float()).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high).detach()
    loss = agg_loss(-weight * advantages * logprobs.float(), response_mask, agg, norm)
    with torch.no_grad():
        clipfrac = masked_mean((weight != ratio).float(), response_mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask)
        ratio_mean = masked_mean(ratio, response_mask)
    return PolicyLossOut(loss, clipfrac, approx_kl, ratio_mean)


@dataclass(frozen=True)
class PolicyLoss:
    """A registry entry.

    fn: the loss function (signature above).
    clip_low, clip_high: the paper's clip epsilons, what `algo.clip_eps_low/high: null` resolve to (None: the
      ppo.clip_eps of the run, the clipped surrogate's one symmetric range).
    loss_agg: the aggregation of the paper, what `loss.agg: null` resolves to (None: the estimator's default).
    agg_fixed: the objective is defined per response, so loss.agg may not be anything else (gspo).
    """

    name: str
    fn: Callable[..., PolicyLossOut]
    clip_low: float | None = None
    clip_high: float | None = None
    loss_agg: str | None = None
    agg_fixed: bool = False


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo": PolicyLoss("ppo", ppo_loss),
    "gspo": PolicyLoss("gspo", gspo_loss, clip_low=3e-4, clip_high=4e-4, loss_agg="seq_mean_token_mean",
                       agg_fixed=True),
    "cispo": PolicyLoss("cispo", cispo_loss, clip_low=1.0, clip_high=3.0, loss_agg="token_mean"),
}


def get_policy_loss(name: str) -> PolicyLoss:
    """The registry entry of `name`; a ValueError lists the allowed names."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss '{name}' (allowed: {', '.join(POLICY_LOSSES)})")
    return POLICY_LOSSES[name]


def resolve_clip(name: str, clip_eps: float, clip_eps_low: float | None,
                 clip_eps_high: float | None) -> tuple[float, float]:
    """(clip_low, clip_high) of policy loss `name`: the configured algo.clip_eps_low/high, else the paper's
    (POLICY_LOSSES), else ppo.clip_eps."""
    entry = get_policy_loss(name)
    low = clip_eps_low if clip_eps_low is not None else entry.clip_low
    high = clip_eps_high if clip_eps_high is not None else entry.clip_high
    return (clip_eps if low is None else low), (clip_eps if high is None else high)
