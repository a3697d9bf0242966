"""The floor: one PPO step the way a competent plain torch/transformers implementation writes it, no framework.

What it does by default (the usual separate-model PPO of TRL's PPOTrainer / OpenRLHF, written plainly):
- four models: the policy (causal LM), a frozen reference copy, a value model and a reward model; the value and
  reward models are `AutoModelForSequenceClassification` (backbone + a 1-output score head, no LM head): the
  value model's score head is applied to every response position, the reward model's pooled at the last token;
- rollout with `generate()` and its KV cache;
- log-probs of the policy and the reference from the LM head applied to the response positions only (no
  full-vocabulary logits over the prompt);
- old log-probs and values from a no-grad forward before the update;
- GAE, whitened advantages, clipped surrogate and clipped value loss, one backward for both;
- fused AdamW (one kernel over all parameters), gradient clipping;
- fp32 by default; `bf16=True` runs every forward and backward under bf16 autocast (weights and optimizer
  stay fp32), the usual mixed-precision recipe.
No sleeps, no extra passes: each call is one a straightforward implementation needs.

Two design options, off by default (ppolm's defaults, written the floor's plain way), so that a benchmark can
set the same design against ppolm and see only the implementation differ:
- `value_head=True`: no value model; V(s_t) = a Linear(hidden, 1) on the policy's last hidden states, from the
  policy's own forward, trained with the policy by one AdamW (one gradient-norm clip over both);
- `fused_first_forward=True`: the step is one PPO epoch of one minibatch, so the update's forward runs on the
  weights that sampled: its detached log-probs and values are the old ones and the no-grad forward is skipped.
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


def _hidden(model, ids, attn, R):
    """Last hidden states (B, R, H) at the R positions that predict the response tokens."""
    h = _backbone(model)(input_ids=ids, attention_mask=attn, position_ids=_positions(attn)).last_hidden_state
    return h[:, -R - 1:-1]


def _token_logprobs(model, h, labels):
    """log pi(label) (B, R) from hidden states (B, R, H): the LM head on those positions only."""
    logits = model.get_output_embeddings()(h).float()
    return torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _logprobs(model, ids, attn, R):
    """log pi(y_t) of the R response tokens: backbone over the sequence, LM head on the R positions only."""
    return _token_logprobs(model, _hidden(model, ids, attn, R), ids[:, -R:])


def _values(value_model, ids, attn, R):
    """V(s_t) for the R response positions: the seqcls backbone, its score head on those positions."""
    return value_model.score(_hidden(value_model, ids, attn, R)).squeeze(-1).float()


def seqcls_from(policy) -> nn.Module:
    """A 1-output sequence-classification model with the policy's backbone weights (random score head), fp32."""
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    model.load_state_dict(policy.state_dict(), strict=False)
    return model


class FloorPPO:
    """policy, reference, value model (or value head) and reward model; fused AdamW."""

    def __init__(self, policy, tokenizer, reward_model, lr=1e-6, gamma=1.0, lam=0.95, clip=0.2, kl_coef=0.05,
                 bf16: bool = False, value_head: bool = False, fused_first_forward: bool = False):
        self.policy = policy.float()
        self.tok = tokenizer
        self.ref = copy.deepcopy(policy).eval().requires_grad_(False)
        self.reward = reward_model.float().eval().requires_grad_(False)
        if value_head:
            # V = 0 at the start (zero weights and bias, ppolm's default head init); trained with the policy
            self.value, self.head = None, nn.Linear(policy.config.hidden_size, 1)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            self.opt_p = torch.optim.AdamW([*self.policy.parameters(), *self.head.parameters()], lr=lr, fused=True)
            self.opt_v = None
        else:
            self.value, self.head = seqcls_from(policy), None
            self.opt_p = torch.optim.AdamW(self.policy.parameters(), lr=lr, fused=True)
            self.opt_v = torch.optim.AdamW(self.value.parameters(), lr=lr, fused=True)
        self.gamma, self.lam, self.clip, self.kl_coef = gamma, lam, clip, kl_coef
        self.bf16 = bf16
        self.fused_first_forward = fused_first_forward

    def _amp(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _policy_and_values(self, seq, attn, R):
        """(log-probs, values), each (B, R): with a value head, both from one forward of the policy."""
        if self.head is None:
            return _logprobs(self.policy, seq, attn, R), _values(self.value, seq, attn, R)
        h = _hidden(self.policy, seq, attn, R)
        with torch.autocast("cpu", enabled=False):  # the values in fp32, as the losses
            v = self.head(h.float()).squeeze(-1)
        return _token_logprobs(self.policy, h, seq[:, -R:]), v

    def step(self, ids, attn, R):
        """One PPO step on the prompts ids, attn (B, P), left-padded; returns seconds by phase and the losses."""
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
        if self.fused_first_forward:  # the update's forward, with grad, on the weights that sampled
            with self._amp():
                lp, v = self._policy_and_values(seq, full_attn, R)
            old_lp, old_v = lp.detach(), v.detach()
            with torch.no_grad(), self._amp():
                ref_lp = _logprobs(self.ref, seq, full_attn, R)
        elif self.head is None:  # (the default floor, unchanged: its three no-grad forwards in this order)
            with torch.no_grad(), self._amp():
                old_lp = _logprobs(self.policy, seq, full_attn, R)
                ref_lp = _logprobs(self.ref, seq, full_attn, R)
                old_v = _values(self.value, seq, full_attn, R)
        else:
            with torch.no_grad(), self._amp():
                old_lp, old_v = self._policy_and_values(seq, full_attn, R)
                ref_lp = _logprobs(self.ref, seq, full_attn, R)
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
        if not self.fused_first_forward:
            with self._amp():
                lp, v = self._policy_and_values(seq, full_attn, R)
        ratio = torch.exp(lp - old_lp)
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - self.clip, 1 + self.clip)).mean()
        vc = old_v + (v - old_v).clamp(-self.clip, self.clip)
        vl = 0.5 * torch.max((v - ret) ** 2, (vc - ret) ** 2).mean()
        self.opt_p.zero_grad()
        if self.opt_v is not None:
            self.opt_v.zero_grad()
        (pg + 0.1 * vl).backward()
        if self.head is None:
            nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
            nn.utils.clip_grad_norm_(self.value.parameters(), 1.0)
        else:  # one optimizer, one norm over the policy and its head
            nn.utils.clip_grad_norm_([*self.policy.parameters(), *self.head.parameters()], 1.0)
        self.opt_p.step()
        if self.opt_v is not None:
            self.opt_v.step()
        t4 = time.perf_counter()
        t.update(rollout=t1 - t0, scoring=t2 - t1, ref_values=t3 - t2, update=t4 - t3, total=t4 - t0)
        t.update(loss_policy=float(pg.detach()), loss_value=float(vl.detach()))
        return t


def reward_model_from(policy) -> nn.Module:
    """The reward model both sides score with: a sequence-classification model on the policy's backbone."""
    return seqcls_from(policy)
