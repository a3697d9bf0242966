"""Building the models of a PPO run from its config: policy (+LoRA), value head or separate critic, reference, and
the reward (functions and reward model).

`ActorCritic` bundles every trainable module into one nn.Module so that data parallelism (DDP/FSDP through
accelerate) wraps and all-reduces them together.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import PreTrainedModel

from ppolm.algo.estimators import get_estimator
from ppolm.config import PPORunConfig
from ppolm.fsdp import fsdp_requested
from ppolm.memory import enable_activation_checkpointing
from ppolm.models import load_model, load_tokenizer
from ppolm.models.packing import require_packing, use_varlen_attention
from ppolm.rewards.compose import RewardFn, Scorer
from ppolm.models.policy import (
    SeparateCritic, TokenScores, ValueHead, apply_lora, disable_dropout, frozen_copy, hidden_size, score_tokens,
)


class ActorCritic(nn.Module):
    """policy + (value head | separate critic). forward -> (logprobs, values, entropy) for response tokens."""

    def __init__(self, policy: PreTrainedModel, value_head: ValueHead | None, critic: SeparateCritic | None,
                 temperature: float = 1.0):
        # both None: a critic-free estimator (algo.estimator != gae); forward then returns values None
        super().__init__()
        self.temperature = temperature  # the rollout's: log-probs are scored from logits / temperature
        self.policy = policy
        self.value_head = value_head
        self.critic = critic

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_ids: torch.Tensor,
        need_entropy: bool = False,
        autocast_dtype: torch.dtype | None = None,
        entropy_grad: bool = True,
        packed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """logprobs (B, R), values (B, R) or None without a critic, entropy (B, R) or None; one backbone forward
        in head mode. entropy_grad=False: the entropy is a metric only, computed without a graph. packed: the
        forwards run on the rows' real tokens only (ppolm.models.packing; 0 at padded response positions)."""
        out: TokenScores = score_tokens(
            self.policy, input_ids, attention_mask, response_ids,
            value_head=self.value_head, need_entropy=need_entropy, autocast_dtype=autocast_dtype,
            temperature=self.temperature, entropy_grad=entropy_grad, packed=packed,
        )
        values = out.values
        if self.critic is not None:
            values = self.critic(input_ids, attention_mask, response_ids.shape[1], autocast_dtype, packed=packed)
        return out.logprobs, values, out.entropy

    def is_lora(self) -> bool:
        return hasattr(self.policy, "disable_adapter")

    def critic_module(self) -> nn.Module | None:
        """The trainable value model (head or separate critic), None for a critic-free estimator."""
        return self.value_head if self.value_head is not None else self.critic


def build_actor_critic(cfg: PPORunConfig, amp: torch.dtype | None) -> tuple[ActorCritic, PreTrainedModel | None]:
    """(actor_critic, reference). The reference is None with LoRA (adapters disabled instead) and when the
    KL penalty is off for the whole run (kl.coef = 0, not adaptive); no value model when `algo.estimator` is
    critic-free: no weights and no forward the maths does not need."""
    policy = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    disable_dropout(policy)
    enable_activation_checkpointing(policy, cfg.gradient_checkpointing)
    kl_needed = cfg.kl.coef > 0 or cfg.kl.adaptive
    reference = None
    if not cfg.lora.enabled and kl_needed:
        # linear weights pre-rounded to the autocast dtype (same forward, half their memory); not under FSDP2,
        # whose units shard parameters of one dtype
        reference = frozen_copy(policy, matmul_dtype=None if fsdp_requested() else amp)
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    # Value-head init draws from the global RNG: seed it so every process and every resume builds the same head.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 17)
        critic, value_head = None, None
        if not get_estimator(cfg.algo.estimator).needs_critic:
            pass
        elif cfg.critic.kind == "head":
            value_head = ValueHead(hidden_size(policy), cfg.critic.head_init)
        else:
            # the bare transformer: an LM/score head would get no gradient (DDP: unused parameters)
            if cfg.critic.init == "reward":
                rm = load_model(cfg.reward.model, kind="seqcls", trust_remote_code=cfg.trust_remote_code,
                                seed=cfg.seed)
                backbone, head = rm.base_model, ValueHead(hidden_size(rm), cfg.critic.head_init)
                # The reward model's own score head starts the value head (as OpenRLHF's critic does): V(prefix)
                # is then the reward model's score of the text so far, the natural first guess of the return,
                # where a zero head had not learned that scale after the RLHF flow's 24 steps (explained
                # variance ~0 throughout, docs/results.md).
                head.copy_from(rm.score)
            else:
                backbone = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed).base_model
                head = ValueHead(hidden_size(backbone), cfg.critic.head_init)
            disable_dropout(backbone)
            critic = SeparateCritic(backbone, head)
    if cfg.ppo.max_tokens is not None:  # packed micro-batches (ppolm.models.packing)
        require_packing(policy)
        for model in (policy, critic, reference):
            use_varlen_attention(model)
    return ActorCritic(policy, value_head, critic, temperature=cfg.rollout.temperature), reference


def param_groups(model: ActorCritic, lr: float, critic_lr: float | None) -> list[dict]:
    """Two AdamW groups: the policy's trainable weights, and the critic's (its own LR when configured)."""
    policy_params = [p for p in model.policy.parameters() if p.requires_grad]
    critic_modules = [m for m in (model.value_head, model.critic) if m is not None]
    critic_params = [p for m in critic_modules for p in m.parameters() if p.requires_grad]
    groups = [{"params": policy_params, "lr": lr}]
    if critic_params:
        groups.append({"params": critic_params, "lr": critic_lr or lr})
    return groups


@torch.no_grad()
def reference_logprobs(
    actor: ActorCritic,
    reference: PreTrainedModel | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_ids: torch.Tensor,
    amp: torch.dtype | None,
    packed: bool = False,
) -> torch.Tensor:
    """log pi_ref(response tokens), (B, R): the frozen copy, or the policy with its LoRA adapters off (packed: as
    in `ActorCritic.forward`)."""
    t = actor.temperature  # the reference is scored at the sampling temperature too, so KL compares like with like
    if reference is not None:
        return score_tokens(reference, input_ids, attention_mask, response_ids, autocast_dtype=amp,
                            temperature=t, packed=packed).logprobs
    ctx = actor.policy.disable_adapter() if actor.is_lora() else contextlib.nullcontext()
    with ctx:
        return score_tokens(actor.policy, input_ids, attention_mask, response_ids, autocast_dtype=amp,
                            temperature=t, packed=packed).logprobs


def build_scorer(cfg: PPORunConfig, reward_fn: RewardFn | list[RewardFn] | None, extra_fns: list[RewardFn], task,
                 device: torch.device, amp: torch.dtype | None) -> Scorer:
    """The run's reward: `reward_fn` (the Python API's, weight 1), the config's reward.functions (`extra_fns`,
    resolved, with their weights) and reward.model (frozen, in bf16 for bf16 runs); the task's own reward
    functions when none of these is given."""
    r = cfg.reward
    fns: list[tuple[RewardFn, float]] = []
    if reward_fn is not None:
        fns += [(f, 1.0) for f in (reward_fn if isinstance(reward_fn, list) else [reward_fn])]
    fns += [(fn, f.weight) for fn, f in zip(extra_fns, r.functions)]
    if not fns and r.model is None:
        fns = task.reward_functions()
    rm, rm_tok = None, None
    if r.model is not None:
        rm = load_model(r.model, kind="seqcls", trust_remote_code=cfg.trust_remote_code,
                        precision="bf16" if amp == torch.bfloat16 else "fp32").to(device)
        rm.requires_grad_(False)
        rm.eval()
        rm_tok = load_tokenizer(r.model, trust_remote_code=cfg.trust_remote_code)
    return Scorer(fns, rm, rm_tok, r.model_weight, r.normalize, r.clip, r.missing_eos_penalty, amp)


def shared_reference(reference, model: str, task, world_size: int):
    """The run's frozen reference when the held-out checks' reference model (the task's `reference_model`
    option) is that same model, on one process (a sharded reference cannot run on the main process alone), so
    the checks need no second copy of the weights; else None (the checks load their own)."""
    from ppolm.models.load import resolve

    name = getattr(getattr(task, "options", None), "reference_model", None)
    if reference is None or world_size != 1 or not name:
        return None
    return reference if resolve(name) == resolve(model) else None
