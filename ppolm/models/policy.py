"""The models of a PPO run: policy, value function (head or separate critic), frozen reference.

The maths needs, per response token, log pi(token), log pi_ref(token) and V(state). `score_tokens` gets
log-probs and values from ONE backbone forward when the critic is a value head; with LoRA the reference is
the same model with its adapters disabled, so no second copy of the weights is held.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ppolm.ops import entropy_from_logits, logprobs_from_logits
from ppolm.rollout import position_ids_from_mask


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratios assume the same function at rollout and update: dropout off everywhere."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class ValueHead(nn.Module):
    """Linear map from the last hidden state to a scalar value; bias 0, weights zero by default.

    Why zero and not the N+ RLHF details' normal init (std 1/sqrt(H+1)): a causal LM's last hidden states
    have norms of tens to hundreds, so a normal-initialized head starts with values of several units on
    random tokens. Against a 0/1 outcome reward those values swamp the advantages for the first dozens of
    steps (explained variance -11 on the embedded model) and PPO then moves the policy on noise. With V = 0
    the first advantages are the (whitened) returns -- REINFORCE with a batch-mean baseline -- and the
    critic takes over as it learns; the gradient dV/dw = h is not zero, so the head still trains."""

    def __init__(self, hidden_size: int, init: str = "zero"):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        if init == "zero":
            nn.init.zeros_(self.summary.weight)
        else:
            nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, R, H) -> (B, R) in fp32."""
        return self.summary(hidden.float()).squeeze(-1)


@dataclass
class TokenScores:
    """Per response token: logprobs (B, R) fp32, values (B, R) fp32 or None, entropy (B, R) or None."""

    logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor | None


def autocast_ctx(dtype: torch.dtype | None, device: torch.device):
    """bf16 autocast for the backbone; a no-op for fp32 runs."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def response_hidden(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, R: int
) -> torch.Tensor:
    """Last-layer hidden states at the R positions that predict the response tokens. -> (B, R, H).

    logits_to_keep=1 skips the full-vocabulary projection inside the model: we apply it ourselves, in fp32,
    only where it is needed.
    """
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=True, use_cache=False, logits_to_keep=1,
    )
    return out.hidden_states[-1][:, -R - 1 : -1]


def _full(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 root is resharded after a no-grad forward (reference, old log-probs): gather the head for it.
    With grad the root stays unsharded until backward, so the weight is a plain tensor and its gradient
    flows through FSDP's own reduce-scatter."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def lm_logits_fp32(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head in fp32 outside autocast: log-probs and ratios must not carry bf16 rounding."""
    head = model.get_output_embeddings()
    with torch.autocast(hidden.device.type, enabled=False):
        weight = _full(head.weight).float()
        bias = _full(head.bias).float() if getattr(head, "bias", None) is not None else None
        return nn.functional.linear(hidden.float(), weight, bias)


def score_tokens(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_ids: torch.Tensor,
    *,
    value_head: ValueHead | None = None,
    need_entropy: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> TokenScores:
    """log pi(response token) for each response position, and V from `value_head` on the same forward.

    input_ids, attention_mask (B, T) with the response in the last R = response_ids.shape[1] positions.
    """
    R = response_ids.shape[1]
    with autocast_ctx(autocast_dtype, input_ids.device):
        hidden = response_hidden(model, input_ids, attention_mask, R)
    logits = lm_logits_fp32(model, hidden)
    logprobs = logprobs_from_logits(logits, response_ids)
    values = value_head(hidden) if value_head is not None else None
    entropy = entropy_from_logits(logits) if need_entropy else None
    return TokenScores(logprobs, values, entropy)


class SeparateCritic(nn.Module):
    """A value model with its own backbone (a copy of the policy or of the reward model) and a value head."""

    def __init__(self, backbone: PreTrainedModel, head: ValueHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, R: int, autocast_dtype: torch.dtype | None
    ) -> torch.Tensor:
        """V for the R response positions, (B, R) fp32."""
        with autocast_ctx(autocast_dtype, input_ids.device):
            hidden = response_hidden(self.backbone, input_ids, attention_mask, R)
        return self.head(hidden)


def hidden_size(model: PreTrainedModel) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))


def frozen_copy(model: PreTrainedModel, dtype: torch.dtype | None) -> PreTrainedModel:
    """A frozen reference copy; stored in bf16 when training runs in bf16 (half the memory, faster)."""
    ref = copy.deepcopy(model)
    if dtype is not None:
        ref = ref.to(dtype)
    ref.requires_grad_(False)
    ref.eval()
    return ref


def apply_lora(model: PreTrainedModel, r: int, alpha: float, dropout: float, target_modules) -> PreTrainedModel:
    """Wrap `model` with peft LoRA adapters; only adapter weights train."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


@contextlib.contextmanager
def reference_mode(policy: PreTrainedModel):
    """With LoRA, the reference is the base model: adapters disabled for the duration."""
    with policy.disable_adapter():
        yield
