"""Typed batch records that flow between the phases of a PPO step.

Shapes: B batch (rows on this process; the k = rollout.samples_per_prompt rows of a prompt are contiguous),
P prompt length (left-padded), R response length (right-padded), T = P + R. Masks are float tensors, 1.0 on
real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class Rollout:
    """Sampled responses and what the sampler knew about them.

    prompt_ids     (B, P) long  left-padded prompt tokens
    prompt_mask    (B, P) float 1 on real prompt tokens
    response_ids   (B, R) long  sampled tokens, right-padded after EOS / stop / max length
    response_mask  (B, R) float 1 on tokens that belong to the response (EOS included)
    ended          (B,)   bool  True when the response ended with EOS or a stop string (not cut by length)
    prompts        B prompt strings (after chat template); completions: B decoded response strings
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    prompts: list[str]
    completions: list[str]

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, T) prompt and response concatenated."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, T) long mask over prompt and response."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1).long()


@dataclass(frozen=True)
class Experience:
    """Everything the PPO update needs, computed without grad before the update.

    input_ids, attention_mask (B, T); response_mask (B, R)
    old_logprobs   (B, R) fp32 log pi_old(token) under the policy that sampled
    ref_logprobs   (B, R) fp32 log pi_ref(token)
    old_values     (B, R) fp32 critic values V(s_t) before the update (zeros for a critic-free estimator)
    scores         (B,)   fp32 sequence reward (after normalization, clipping, EOS penalty)
    rewards        (B, R) fp32 per-token shaped rewards (score at the last token - kl_coef * KL)
    kl             (B, R) fp32 per-token KL estimate to the reference
    advantages     (B, R) fp32 advantages of algo.estimator (GAE, or one per sequence broadcast over its tokens)
    returns        (B, R) fp32 value targets (critic-free estimators: equal to the advantages, unused)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "Experience":
        """Rows `index` of every field (a minibatch)."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})
