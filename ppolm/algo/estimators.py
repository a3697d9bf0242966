"""Advantage estimators, selected by name (`algo.estimator`): GAE with a critic, and critic-free ones.

Shapes: N rows on this process, R response length. Rows come in groups of k = `rollout.samples_per_prompt`
responses to the same prompt, each group's rows contiguous: rows [g*k, (g+1)*k) belong to prompt g, so
`x.view(-1, k)` puts one group per row. Outcome estimators (grpo, rloo, dr_grpo) turn each response's total
reward (N,) into one advantage per sequence that is broadcast over its response tokens (padding gets 0).

| name         | baseline                      | scale            | critic | loss.agg default        | source            |
| ------------ | ----------------------------- | ---------------- | ------ | ----------------------- | ----------------- |
| gae          | V(s_t) from the critic        | global whitening | yes    | token_mean              | Schulman 2016     |
| grpo         | group mean                    | / group std      | no     | seq_mean_token_mean     | Shao 2024 (GRPO)  |
| rloo         | mean of the other k-1 samples | none             | no     | seq_mean_token_sum_norm | Ahmadian 2024     |
| reinforce_pp | none (token returns)          | global whitening | no     | token_mean              | Hu 2025           |
| dr_grpo      | group mean                    | none             | no     | seq_mean_token_sum_norm | Liu 2025 Dr. GRPO |

The group estimators (grpo, rloo, dr_grpo) need k >= 2: with k = 1 there is no baseline and the advantage is
the raw reward (the config refuses it; the functions below still define k = 1, as verl does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppolm.algo.advantages import gae


@dataclass(frozen=True)
class Estimator:
    """What the trainer must do around an estimator.

    needs_critic: a value model is built, its values fed in, its loss trained and logged.
    whiten: 'config' (ppo.whiten_advantages decides), 'always' (part of the method) or 'never'.
    loss_agg: the policy-loss aggregation of the method's paper (ppolm.algo.aggregation), what `loss.agg: null`
      resolves to. gae / reinforce_pp: token_mean (N+ details; OpenRLHF's REINFORCE++). grpo:
      seq_mean_token_mean (Shao et al. 2024 eq. 3: 1/G sum_i 1/|o_i| sum_t). dr_grpo: seq_mean_token_sum_norm
      (Liu et al. 2025: 1/|o_i| replaced by a constant). rloo: seq_mean_token_sum_norm, because Ahmadian et al.
      2024 treat the whole response as one action: the gradient is A_i grad log pi(y_i | x) = A_i sum_t grad log
      pi(y_t | ...), a sum over the response's tokens averaged over responses; the constant (max_new_tokens)
      only scales it to the size of a token mean.
    group_baseline: the baseline comes from the other responses of the group, so k = samples_per_prompt >= 2.
    """

    name: str
    needs_critic: bool
    whiten: str
    loss_agg: str = "token_mean"
    group_baseline: bool = False


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator("gae", needs_critic=True, whiten="config"),
    "grpo": Estimator("grpo", needs_critic=False, whiten="never", loss_agg="seq_mean_token_mean",
                      group_baseline=True),
    "rloo": Estimator("rloo", needs_critic=False, whiten="never", loss_agg="seq_mean_token_sum_norm",
                      group_baseline=True),
    "reinforce_pp": Estimator("reinforce_pp", needs_critic=False, whiten="always"),
    "dr_grpo": Estimator("dr_grpo", needs_critic=False, whiten="never", loss_agg="seq_mean_token_sum_norm",
                         group_baseline=True),
}


def get_estimator(name: str) -> Estimator:
    """The registry entry of `name`; a ValueError lists the allowed names."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator '{name}' (allowed: {', '.join(ESTIMATORS)})")
    return ESTIMATORS[name]


def _groups(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N / k, k), one group of k contiguous rows per row."""
    if group_size < 1 or returns.shape[0] % group_size:
        raise ValueError(f"{returns.shape[0]} rows do not split into groups of {group_size}")
    return returns.float().view(-1, group_size)


def grpo_advantages(returns: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantage: A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std Bessel-corrected.

    returns (N,) total reward per response -> (N,). A group whose rewards are all equal gets A = 0 (nothing to
    learn from it); a group of one has no statistics, so A = r (mean 0, std 1, as verl does).
    """
    g = _groups(returns, group_size)
    if group_size == 1:
        return g.flatten()
    adv = (g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + eps)
    return adv.flatten()


def dr_grpo_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO outcome advantage: A_i = r_i - mean(r_group), no division by the std (which up-weights groups
    that are nearly all right or all wrong). (N,) -> (N,); a group of one gives A = r."""
    g = _groups(returns, group_size)
    if group_size == 1:
        return g.flatten()
    return (g - g.mean(-1, keepdim=True)).flatten()


def rloo_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j = k / (k - 1) * (r_i - mean(r_group)), an unbiased baseline that
    does not depend on the sample it scores. (N,) -> (N,); a group of one has no other sample: A = r."""
    g = _groups(returns, group_size)
    if group_size == 1:
        return g.flatten()
    loo_mean = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return (g - loo_mean).flatten()


def discounted_returns(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++ token returns G_t = sum_{s >= t} gamma^(s - t) r_s over the response (no critic).

    rewards, response_mask (B, R) -> (B, R), zero on padding. With the score at the last token and the KL
    penalty on every token, G_t = score - kl_coef * (KL still to come from t on) for gamma = 1.
    """
    rewards, mask = rewards.float(), response_mask.float()
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def per_token(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one advantage per sequence over its response tokens: (B,), (B, R) -> (B, R)."""
    return advantages.float().unsqueeze(-1) * response_mask.float()


def estimate(
    name: str,
    rewards: torch.Tensor,
    values: torch.Tensor | None,
    response_mask: torch.Tensor,
    *,
    group_size: int,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (B, R) of estimator `name`, before any whitening (the caller does it globally).

    rewards (B, R): per-token rewards (score at the last token, minus kl_coef x KL when the KL is in the
    reward); values (B, R) for 'gae', else None. Outcome estimators use each row's total reward
    rewards.sum(-1). Critic-free estimators return returns = advantages (no value target is trained).
    """
    if name == "gae":
        if values is None:
            raise ValueError("estimator 'gae' needs values from a critic")
        return gae(rewards, values, response_mask, gamma, lam)
    if name == "reinforce_pp":
        adv = discounted_returns(rewards, response_mask, gamma)
        return adv, adv
    seq_returns = (rewards.float() * response_mask).sum(-1)
    outcome = {"grpo": grpo_advantages, "rloo": rloo_advantages, "dr_grpo": dr_grpo_advantages}
    if name not in outcome:
        get_estimator(name)  # raises with the allowed names
    adv = per_token(outcome[name](seq_returns, group_size), response_mask)
    return adv, adv
