"""The floor: one PPO step the way a competent plain torch/transformers implementation writes it, no framework.

What it does (the usual separate-model PPO of TRL's PPOTrainer / OpenRLHF, written plainly):
- four models: the policy (causal LM), a frozen reference copy, a value model and a reward model; the value and
  reward models are `AutoModelForSequenceClassification` (backbone + a 1-output score head, no LM head): the
  value model's score head is applied to every response position, the reward model's pooled at the last token;
- rollout with `generate()` and its KV cache;
- log-probs of the policy and the reference from the LM head applied to the response positions only (no
  full-vocabulary logits over the prompt);
- GAE, whitened advantages, clipped surrogate and clipped value loss, one backward for both;
- fused AdamW (one kernel over all parameters), gradient clipping;
- fp32 by default; `bf16=True` runs every forward and backward under bf16 autocast (weights and optimizer
  stay fp32), the usual mixed-precision recipe.
No sleeps, no extra passes: each call is one a straightforward implementation needs.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification


def _positions(attn: torch.Tensor) -> torch.Tensor:
    return (attn.cumsum(-1) - 1).clamp(min=0)


def _backbone(model):
    return getattr(model, model.base_model_prefix)


def _logprobs(model, ids, attn, R):
    """log pi(y_t) of the R response tokens: backbone over the sequence, LM head on the R positions only."""
    h = _backbone(model)(input_ids=ids, attention_mask=attn, position_ids=_positions(attn)).last_hidden_state
    logits = model.get_output_embeddings()(h[:, -R - 1:-1]).float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, -R:].unsqueeze(-1)).squeeze(-1)


def _values(value_model, ids, attn, R):
    """V(s_t) for the R response positions: the seqcls backbone, its score head on those positions."""
    h = _backbone(value_model)(input_ids=ids, attention_mask=attn, position_ids=_positions(attn)).last_hidden_state
    return value_model.score(h[:, -R - 1:-1]).squeeze(-1).float()


def seqcls_from(policy) -> nn.Module:
    """A 1-output sequence-classification model with the policy's backbone weights (random score head), fp32."""
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    model.load_state_dict(policy.state_dict(), strict=False)
    return model


class FloorPPO:
    """policy, reference, value model and reward model; fused AdamW for the policy and the value model."""

    def __init__(self, policy, tokenizer, reward_model, lr=1e-6, gamma=1.0, lam=0.95, clip=0.2, kl_coef=0.05,
                 bf16: bool = False):
        self.policy = policy.float()
        self.tok = tokenizer
        self.ref = copy.deepcopy(policy).eval().requires_grad_(False)
        self.value = seqcls_from(policy)
        self.reward = reward_model.float().eval().requires_grad_(False)
        self.opt_p = torch.optim.AdamW(self.policy.parameters(), lr=lr, fused=True)
        self.opt_v = torch.optim.AdamW(self.value.parameters(), lr=lr, fused=True)
        self.gamma, self.lam, self.clip, self.kl_coef = gamma, lam, clip, kl_coef
        self.bf16 = bf16

    def _amp(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def step(self, ids, attn, R):
        t = {}
        t0 = time.perf_counter()
        with torch.no_grad(), self._amp():
            seq = self.policy.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0,
                                       max_new_tokens=R, min_new_tokens=R, pad_token_id=self.tok.pad_token_id)
        full_attn = torch.cat([attn, torch.ones(ids.shape[0], seq.shape[1] - ids.shape[1], dtype=attn.dtype)], 1)
        R = seq.shape[1] - ids.shape[1]
        t1 = time.perf_counter()
        with torch.no_grad(), self._amp():
            scores = self.reward(input_ids=seq, attention_mask=full_attn).logits[:, 0].float()
        t2 = time.perf_counter()
        with torch.no_grad(), self._amp():
            old_lp = _logprobs(self.policy, seq, full_attn, R)
            ref_lp = _logprobs(self.ref, seq, full_attn, R)
            old_v = _values(self.value, seq, full_attn, R)
        rewards = -self.kl_coef * (old_lp - ref_lp)
        rewards[:, -1] += scores
        adv = torch.zeros_like(rewards)
        last = torch.zeros(seq.shape[0])
        for i in reversed(range(R)):
            nv = old_v[:, i + 1] if i + 1 < R else torch.zeros_like(last)
            delta = rewards[:, i] + self.gamma * nv - old_v[:, i]
            last = delta + self.gamma * self.lam * last
            adv[:, i] = last
        ret = adv + old_v
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        t3 = time.perf_counter()
        with self._amp():
            lp = _logprobs(self.policy, seq, full_attn, R)
            v = _values(self.value, seq, full_attn, R)
        ratio = torch.exp(lp - old_lp)
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - self.clip, 1 + self.clip)).mean()
        vc = old_v + (v - old_v).clamp(-self.clip, self.clip)
        vl = 0.5 * torch.max((v - ret) ** 2, (vc - ret) ** 2).mean()
        self.opt_p.zero_grad()
        self.opt_v.zero_grad()
        (pg + 0.1 * vl).backward()
        nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        nn.utils.clip_grad_norm_(self.value.parameters(), 1.0)
        self.opt_p.step()
        self.opt_v.step()
        t4 = time.perf_counter()
        t.update(rollout=t1 - t0, scoring=t2 - t1, ref_values=t3 - t2, update=t4 - t3, total=t4 - t0)
        return t


def reward_model_from(policy) -> nn.Module:
    """The reward model both sides score with: a sequence-classification model on the policy's backbone."""
    return seqcls_from(policy)
