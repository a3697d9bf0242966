"""Reward-model training from preference pairs (InstructGPT step 2, Ouyang et al. 2022; Bradley-Terry 1952).

A reward model r(x, y) is a sequence-classification model with one output (a causal LM with a new linear
`score` head, `load_model(kind='seqcls')`), read at the last real token of prompt + completion. It is fitted
to pairs (x, y_chosen, y_rejected) by

    L = -mean log sigmoid(r(x, y_chosen) - r(x, y_rejected)),

the mean taken over every pair of the optimizer step (all micro-batches and processes), and judged by the
pairwise accuracy P(r(x, y_chosen) > r(x, y_rejected)) on held-out pairs.

The scored text is exactly what PPO's `reward.model` scores (ppolm/rewards/compose.py reward_model_scores):
the chat-templated prompt followed by the completion, no EOS, tokenized as one string without special tokens,
pooled at the last position of the attention mask (pad == EOS tokenizers such as SmolLM2's are safe).
Deliberately left out: several completions ranked per prompt (K choose 2 pairs), margin terms, reward centering.
Launch: `ppolm rm --config configs/rm-tiny.yaml`; then use output_dir/final as `reward.model` in `ppolm ppo`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ppolm.algo.losses import pairwise_loss
from ppolm.config import CheckpointConfig, CommonConfig, LogConfig, LoraConfig, OptimConfig, save_config
from ppolm.data.collate import apply_chat_template, right_pad_collate
from ppolm.data.preferences import PreferencePair
from ppolm.errors import ModelLoadError
from ppolm.models import load_model, load_tokenizer
from ppolm.models.policy import autocast_ctx
from ppolm.plan_report import settle_checkpointing
from ppolm.runtime import Runtime, autocast_dtype
from ppolm.trainers.common import (
    RunCheckpointer, export_model, make_optimization, prepare_model, total_steps, train_loop,
)
from ppolm.trainers.pair_data import load_pair_splits
from ppolm.trainers.run_dir import prepare_output_dir
from ppolm.trainers.prompts import step_rows


class RMRunConfig(CommonConfig):
    """Configuration of `ppolm rm`."""

    data: str | None = None
    """JSONL preference pairs {prompt, chosen, rejected}; null = the demo pairs (more 'demo_chars' is better)."""
    eval_data: str | None = None
    """Held-out pairs file; null splits off `eval_fraction` of the training pairs."""
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    """Fraction of pairs held out for the pairwise accuracy when eval_data is null."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many training pairs."""
    demo_pairs: int = Field(256, ge=2)
    """How many demo pairs to generate when data is null."""
    demo_chars: str = Field("a", min_length=1)
    """The demo preference: chosen completions are rich in these characters (as the toy task's reward)."""
    batch_size: int = Field(8, ge=1)
    """Pairs per optimizer step on each process (each pair is two sequences)."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step whose gradients are summed (must divide batch_size)."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training pairs; when set, replaces max_steps (steps = ceil(epochs x pairs / global batch))."""
    max_length: int = Field(512, ge=2)
    """Pairs with a side longer than this many tokens (prompt + completion) are dropped at load, with a count."""
    use_chat_template: bool = True
    """Score the chat-templated prompt + completion (as PPO does with rollout.use_chat_template)."""
    system_prompt: str | None = None
    """System message of the template; set it to the PPO task's system prompt so both score the same text."""
    eval_every: int = Field(0, ge=0)
    """Held-out pairwise accuracy every N steps (0 = only at the end)."""
    eval_batch_size: int = Field(16, ge=1)
    """Pairs per forward when evaluating."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """LoRA adapters on the backbone (the new score head always trains in full); merged on export."""
    log: LogConfig = Field(default_factory=LogConfig)
    """Logging."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing."""

    @model_validator(mode="after")
    def _check_batches(self) -> "RMRunConfig":
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"grad_accum_steps ({self.grad_accum_steps}) must divide batch_size ({self.batch_size})")
        return self


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of prompt + chosen and of prompt + rejected (no special tokens added)."""

    chosen_ids: list[int]
    rejected_ids: list[int]


def scored_text(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, *,
                use_chat_template: bool, system_prompt: str | None) -> str:
    """The text a reward model scores: the prompt as PPO builds it, then the completion."""
    return (apply_chat_template(tokenizer, prompt, system_prompt) if use_chat_template else prompt) + completion


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer: PreTrainedTokenizerBase, *, use_chat_template: bool,
    system_prompt: str | None, max_length: int,
) -> tuple[list[TokenizedPair], int]:
    """Tokenize both sides of every pair; returns (pairs, number dropped for a side longer than max_length)."""
    out, dropped = [], 0
    for p in pairs:
        ids = [tokenizer(scored_text(tokenizer, p.prompt, c, use_chat_template=use_chat_template,
                                     system_prompt=system_prompt), add_special_tokens=False)["input_ids"]
               for c in (p.chosen, p.rejected)]
        if max(len(i) for i in ids) > max_length:
            dropped += 1
            continue
        out.append(TokenizedPair(ids[0], ids[1]))
    return out, dropped


class LastTokenReward(nn.Module):
    """A sequence-classification model whose forward (the unit data parallelism wraps) returns one reward per
    row, read at the row's last real token. Mirrors reward_model_scores, with gradients."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.rm = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """input_ids, attention_mask (B, T) right-padded -> rewards (B,) fp32; the head runs in fp32."""
        with autocast_ctx(autocast_dtype, input_ids.device):
            out = self.rm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                          use_cache=False)
        # from the mask, not from pad ids: with pad == EOS a pad-id search would stop at a real EOS
        last = (attention_mask.sum(-1) - 1).clamp(min=0)
        hidden = out.hidden_states[-1][torch.arange(input_ids.shape[0], device=input_ids.device), last]
        with torch.autocast(input_ids.device.type, enabled=False):
            return self.rm.score(hidden.float()).float()[:, 0]


def pair_batch(pairs: list[TokenizedPair], pad_id: int, device: torch.device | None = None):
    """(input_ids, attention_mask) of shape (2B, T), right-padded: rows 0..B-1 chosen, B..2B-1 rejected."""
    ids, mask = right_pad_collate([p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], pad_id)
    return ids.to(device), mask.to(device)


class RMTrainer:
    """Owns the reward model, optimizer and pairs of one run. `train()` runs it; `step(s)` runs one step."""

    def __init__(self, config: RMRunConfig, runtime: Runtime | None = None):
        self.cfg = cfg = config
        self.runtime = runtime or Runtime()
        self.cfg = cfg = settle_checkpointing(cfg, self.runtime)  # 'auto' -> 'selective' here
        self.amp = autocast_dtype(cfg.precision, self.runtime.device)
        self.tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        train_pairs, self.eval_pairs = self._load_data()
        # after the data (its errors are more specific), before any model loads
        prepare_output_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir,
                           is_main=self.runtime.is_main)
        self.train_pairs = train_pairs
        self.global_batch = cfg.batch_size * self.runtime.world_size
        self.total_steps = total_steps(cfg.max_steps, cfg.epochs, len(train_pairs), self.global_batch)
        rm = load_model(cfg.model, kind="seqcls", num_labels=1, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
        if not isinstance(getattr(rm, "score", None), nn.Linear):
            raise ModelLoadError(f"model '{cfg.model}': its sequence-classification head is not a linear 'score' "
                                 "layer; ppolm reward models need one")
        if rm.config.pad_token_id is None:
            # HF sequence classifiers refuse batches > 1 without one; saved with the model, so PPO can batch too
            rm.config.pad_token_id = self.tokenizer.pad_token_id
        rm = prepare_model(rm, cfg.lora, task_type="SEQ_CLS", gradient_checkpointing=cfg.gradient_checkpointing)
        self.scorer = LastTokenReward(rm).to(self.runtime.device)
        self.scorer.train()  # from_pretrained returns eval mode; activation checkpointing only acts in train mode
        self.runtime.shard(self.scorer)  # FSDP2 only; before the optimizer
        self.optim = make_optimization(self.scorer, self.runtime, cfg.optim, self.total_steps)
        self.model, self.optim.optimizer = self.runtime.prepare(self.scorer, self.optim.optimizer,
                                                                max_grad_norm=self.optim.max_grad_norm)
        self.optim.model = self.model
        self.checkpointer = RunCheckpointer(self.runtime, cfg, self.scorer.rm, self.optim, self._fingerprint)
        self.start_step = self.checkpointer.maybe_resume() if cfg.resume else 0
        if self.runtime.is_main:
            save_config(cfg, cfg.output_dir)

    def _load_data(self) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
        train, held, self._fingerprint = load_pair_splits(self.cfg, self.tokenizer, self.runtime.is_main,
                                                          tokenize_pairs, "rm")
        return train, held

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step (0-based `step`) over this process's batch_size pairs, in grad_accum_steps parts."""
        cfg, rt = self.cfg, self.runtime
        t0 = time.perf_counter()
        pairs = [self.train_pairs[i] for _, i in
                 step_rows(len(self.train_pairs), cfg.seed, step, self.global_batch, rt.rank, cfg.batch_size)]
        size = cfg.batch_size // cfg.grad_accum_steps
        micro = [pairs[k: k + size] for k in range(0, cfg.batch_size, size)]
        n_global = float(self.global_batch)
        tokens = 0.0

        def loss_fn(mb: list[TokenizedPair]) -> tuple[torch.Tensor, dict[str, float]]:
            nonlocal tokens
            ids, mask = pair_batch(mb, self.tokenizer.pad_token_id, rt.device)
            tokens += float(mask.sum())
            scores = self.model(ids, mask, autocast_dtype=self.amp)
            chosen, rejected = scores[: len(mb)], scores[len(mb):]
            # pairwise_loss is a mean over this micro-batch: reweight to a share of the step's global mean, and
            # undo DDP's average over processes.
            loss = pairwise_loss(chosen, rejected) * (len(mb) / n_global)
            with torch.no_grad():
                margin = chosen.float() - rejected.float()
            return loss * rt.world_size, {"loss/rm": float(loss.detach()), "rm/correct": float((margin > 0).sum()),
                                          "rm/margin": float(margin.sum())}

        result = self.optim.step(micro, loss_fn, where=f"rm step {step + 1}")
        seconds = time.perf_counter() - t0
        m = result.metrics
        return {
            "loss/rm": float(rt.sum(m["loss/rm"])), "rm/accuracy": float(rt.sum(m["rm/correct"])) / n_global,
            "rm/margin": float(rt.sum(m["rm/margin"])) / n_global, "optim/lr": result.lr,
            "optim/grad_norm": result.grad_norm, "optim/nonfinite_skipped_total": float(self.optim.nonfinite_total),
            "time/step_s": seconds, "throughput/tokens_per_s": float(rt.sum(tokens)) / seconds,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """eval/pairwise_accuracy (ties count as wrong), eval/loss, eval/margin over the held-out pairs."""
        if not self.eval_pairs:
            return {}
        rt = self.runtime
        mine = self.eval_pairs[rt.rank:: rt.world_size]
        bs = self.cfg.eval_batch_size
        # the unwrapped module: processes may run different numbers of forwards, so no collectives here; under
        # FSDP2 / ZeRO-3 each forward is a collective: every process runs as many, the extra ones on weight-0 pairs
        n_forwards = -(-len(self.eval_pairs) // rt.world_size // bs) if rt.params_sharded else -(-len(mine) // bs)
        correct, loss, margin = 0.0, 0.0, 0.0
        self.scorer.eval()
        for k in range(0, n_forwards * bs, bs):
            chunk, weight = (mine[k: k + bs], 1.0) if k < len(mine) else (self.eval_pairs[:bs], 0.0)
            ids, mask = pair_batch(chunk, self.tokenizer.pad_token_id, rt.device)
            scores = self.scorer(ids, mask, autocast_dtype=self.amp)
            diff = scores[: len(chunk)] - scores[len(chunk):]
            correct += weight * float((diff > 0).sum())
            loss += weight * float(pairwise_loss(scores[: len(chunk)], scores[len(chunk):])) * len(chunk)
            margin += weight * float(diff.sum())
        self.scorer.train()
        n = float(rt.sum(len(mine)))
        return {"eval/pairwise_accuracy": float(rt.sum(correct)) / n, "eval/loss": float(rt.sum(loss)) / n,
                "eval/margin": float(rt.sum(margin)) / n}

    def export_final(self) -> Path | None:
        """output_dir/final: a sequence-classification HF directory (LoRA merged) + tokenizer, usable as
        `reward.model` in PPO, and ppolm_reward.json saying which text it was trained to score."""
        out = None
        state = self.runtime.full_state_dict(self.scorer.rm)  # a collective under FSDP2 / ZeRO-3
        if self.runtime.is_main:
            info = {"scores": "chat-templated prompt + completion (no EOS), at the last real token",
                    "use_chat_template": self.cfg.use_chat_template, "system_prompt": self.cfg.system_prompt}
            out = export_model(self.scorer.rm, self.tokenizer, Path(self.cfg.output_dir) / "final",
                               {"ppolm_reward.json": info}, state_dict=state)
        self.runtime.wait()
        return out

    def train(self) -> dict[str, float]:
        """Run steps start_step .. total_steps; returns the last step's metrics (with the final evaluation)."""
        return train_loop(self, "rm", ("loss/rm", "eval/pairwise_accuracy", "time/step_s"))

    def generating_model(self) -> nn.Module:
        """A reward model does not generate: it has no task-metric evaluation during training."""
        raise NotImplementedError("reward models are not evaluated by generation")


def train_rm(config: RMRunConfig) -> dict[str, float]:
    """Python API: train a reward model with `config`; the model is written to output_dir/final."""
    return RMTrainer(config).train()
