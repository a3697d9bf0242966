"""The raw-compute floor: one PPO step written with plain fp32 torch/transformers calls, no framework.

The design most PPO trainers use: four separate models (policy, frozen reference, value model with its own
backbone, reward model), `generate()` for rollout, full-vocabulary logits for every forward. No sleeps, no
extra work: each call is what a straightforward implementation makes, so ppolm's speed-up is measured against
honest plain code.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification


def _logprobs(model, ids, attn, R):
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -R - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, -R:].unsqueeze(-1)).squeeze(-1)


def _values(backbone, head, ids, attn, R):
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    h = backbone(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True).hidden_states[-1]
    return head(h[:, -R - 1:-1]).squeeze(-1)


class FloorPPO:
    """policy, reference, value model and reward model as four fp32 models; AdamW for policy and critic."""

    def __init__(self, policy, tokenizer, reward_model, lr=1e-6, gamma=1.0, lam=0.95, clip=0.2, kl_coef=0.05):
        self.policy = policy.float()
        self.tok = tokenizer
        self.ref = copy.deepcopy(policy).eval().requires_grad_(False)
        self.value_backbone = copy.deepcopy(policy)
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        self.reward = reward_model.float().eval().requires_grad_(False)
        self.opt_p = torch.optim.AdamW(self.policy.parameters(), lr=lr)
        self.opt_v = torch.optim.AdamW([*self.value_backbone.parameters(), *self.value_head.parameters()], lr=lr)
        self.gamma, self.lam, self.clip, self.kl_coef = gamma, lam, clip, kl_coef

    def step(self, ids, attn, R):
        t = {}
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.policy.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0,
                                       max_new_tokens=R, min_new_tokens=R, pad_token_id=self.tok.pad_token_id)
        seq = out
        full_attn = torch.cat([attn, torch.ones(ids.shape[0], seq.shape[1] - ids.shape[1], dtype=attn.dtype)], 1)
        R = seq.shape[1] - ids.shape[1]
        t1 = time.perf_counter()
        with torch.no_grad():
            scores = self.reward(input_ids=seq, attention_mask=full_attn).logits[:, 0]
        t2 = time.perf_counter()
        with torch.no_grad():
            old_lp = _logprobs(self.policy, seq, full_attn, R)
            ref_lp = _logprobs(self.ref, seq, full_attn, R)
            old_v = _values(self.value_backbone, self.value_head, seq, full_attn, R)
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
        lp = _logprobs(self.policy, seq, full_attn, R)
        ratio = torch.exp(lp - old_lp)
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - self.clip, 1 + self.clip)).mean()
        v = _values(self.value_backbone, self.value_head, seq, full_attn, R)
        vc = old_v + (v - old_v).clamp(-self.clip, self.clip)
        vl = 0.5 * torch.max((v - ret) ** 2, (vc - ret) ** 2).mean()
        self.opt_p.zero_grad()
        self.opt_v.zero_grad()
        (pg + 0.1 * vl).backward()
        nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt_p.step()
        self.opt_v.step()
        t4 = time.perf_counter()
        t.update(rollout=t1 - t0, scoring=t2 - t1, ref_values=t3 - t2, update=t4 - t3, total=t4 - t0)
        return t


def reward_model_from(policy) -> nn.Module:
    """A sequence-classification model with the policy's backbone (random score head), fp32."""
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    rm.load_state_dict(policy.state_dict(), strict=False)
    return rm
