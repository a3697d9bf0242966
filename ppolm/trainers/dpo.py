"""Direct Preference Optimization (DPO, Rafailov et al. 2023), and IPO (Azar et al. 2023) as an option: the
policy is fitted to preference pairs (x, y_chosen, y_rejected) directly, with no reward model and no sampling.

    L = mean over the step's pairs of  -log sigmoid(beta h)   (loss_type sigmoid)  or  (h - 1/(2 beta))^2  (ipo),
    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))        (ppolm.algo.dpo)

log pi(y|x) is the sum of the completion's token log-probs (per-token mean for IPO), prompt tokens being context
only. The text is the chat-templated prompt, then the completion and EOS, tokenized as SFT tokenizes a
demonstration (`ppolm.trainers.sft.tokenize_example`), so the policy learns where to stop as well. pi_ref is the
starting model, frozen: a copy, or with LoRA the same model with its adapters disabled (no second copy); its
log-probs are computed once per batch without grad (`precompute_ref_logprobs`: once for every pair before the
first step, and no copy is held at all). Data: preference pairs as `ppolm rm` reads them (ppolm.data.preferences).
The mean over pairs is taken over the whole optimizer step (every micro-batch and process), so accumulation 8x1
equals 1x8; one shared optimizer step (ppolm.update), crash-safe checkpoints with exact resume and the step loop
of ppolm.trainers.common; held-out pairs give eval/loss, eval/reward_accuracy and eval/margin.
Deliberately left out: reference-free variants (SimPO, ORPO), the hinge and other loss types, an SFT term (RPO),
a task metric by generation during training (pairs carry no task). Launch: `ppolm dpo --config configs/dpo-tiny.yaml`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import PreTrainedTokenizerBase

from ppolm.algo.dpo import dpo_loss, sequence_logprobs
from ppolm.config import CheckpointConfig, CommonConfig, LogConfig, LoraConfig, OptimConfig, save_config
from ppolm.data.collate import apply_chat_template
from ppolm.data.preferences import PreferencePair
from ppolm.errors import ModelLoadError
from ppolm.eval.intervals import binomial_se
from ppolm.fsdp import fsdp_requested
from ppolm.models import load_model, load_tokenizer
from ppolm.models.policy import frozen_copy
from ppolm.plan_report import settle_checkpointing
from ppolm.runtime import Runtime, autocast_dtype
from ppolm.tasks.base import DECODING_FILE, Decoding, decoding_record
from ppolm.trainers.common import (
    RunCheckpointer, export_model, is_lora, make_optimization, prepare_model, total_steps, train_loop,
)
from ppolm.trainers.prompts import step_rows
from ppolm.trainers.pair_data import load_pair_splits
from ppolm.trainers.run_dir import prepare_output_dir
from ppolm.trainers.sft import CompletionLogprobs, SFTBatch, SFTSequence, collate_sft, tokenize_example


class DPORunConfig(CommonConfig):
    """Configuration of `ppolm dpo`."""

    data: str | None = None
    """JSONL preference pairs {prompt, chosen, rejected} (as `ppolm rm` reads them); null = the demo pairs."""
    eval_data: str | None = None
    """Held-out pairs file; null splits off `eval_fraction` of the training pairs."""
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    """Fraction of pairs held out for eval/* when eval_data is null."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many training pairs."""
    demo_pairs: int = Field(256, ge=2)
    """How many demo pairs to generate when data is null."""
    demo_chars: str = Field("a", min_length=1)
    """The demo preference: chosen completions are rich in these characters (as the toy task's reward)."""
    beta: float = Field(0.1, gt=0.0)
    """Strength of the tie to the reference: the implicit reward is beta x log(pi / pi_ref); IPO's target margin
    is 1 / (2 beta)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """'sigmoid': DPO's -log sigmoid(beta h) on summed log-probs; 'ipo': IPO's (h - 1/(2 beta))^2 on per-token mean
    log-probs (see ppolm/algo/dpo.py)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Conservative DPO: the assumed probability that a pair's label is flipped (sigmoid loss only)."""
    precompute_ref_logprobs: bool = False
    """Score every training and held-out pair with the reference once before the first step, instead of once per
    batch; no reference copy is then held during training (each process scores all training pairs)."""
    batch_size: int = Field(8, ge=1)
    """Pairs per optimizer step on each process (each pair is two sequences; global batch = batch_size x processes)."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step whose gradients are summed (must divide batch_size)."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training pairs; when set, replaces max_steps (steps = ceil(epochs x pairs / global batch))."""
    max_length: int = Field(512, ge=2)
    """Pairs with a side longer than this many tokens (prompt + completion + EOS) are dropped at load, with a count."""
    use_chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template (as PPO, SFT and serving do)."""
    system_prompt: str | None = None
    """System message of the template; written to final/ppolm_decoding.json so serving uses the same one."""
    eval_every: int = Field(0, ge=0)
    """Held-out eval/loss, eval/reward_accuracy and eval/margin every N steps (0 = only at the end)."""
    eval_batch_size: int = Field(16, ge=1)
    """Pairs per forward when evaluating."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """LoRA adapters (the reference is then the base with adapters disabled); merged into the exported model."""
    log: LogConfig = Field(default_factory=LogConfig)
    """Logging."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing."""

    @model_validator(mode="after")
    def _check(self) -> "DPORunConfig":
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"grad_accum_steps ({self.grad_accum_steps}) must divide batch_size ({self.batch_size})")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' only (IPO has no label noise term)")
        return self


@dataclass(frozen=True)
class DPOPair:
    """One pair tokenized for DPO: prompt + chosen + EOS and prompt + rejected + EOS, completion tokens marked."""

    chosen: SFTSequence
    rejected: SFTSequence


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer: PreTrainedTokenizerBase, *, use_chat_template: bool,
    system_prompt: str | None, max_length: int,
) -> tuple[list[DPOPair], int]:
    """Tokenize both sides of every pair; returns (pairs, number dropped for a side longer than max_length)."""
    out, dropped = [], 0
    for p in pairs:
        prompt = apply_chat_template(tokenizer, p.prompt, system_prompt) if use_chat_template else p.prompt
        chosen, rejected = (tokenize_example(tokenizer, prompt, c) for c in (p.chosen, p.rejected))
        if max(len(chosen.input_ids), len(rejected.input_ids)) > max_length:
            dropped += 1
            continue
        out.append(DPOPair(chosen, rejected))
    return out, dropped


def collate_pairs(pairs: list[DPOPair], pad_id: int, device: torch.device | None = None) -> SFTBatch:
    """One right-padded batch of 2B rows: rows 0..B-1 the chosen sides, B..2B-1 the rejected ones (one forward)."""
    return collate_sft([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)


class DPOTrainer:
    """Owns the policy, reference, optimizer and pairs of one DPO run. `train()` runs it; `step(s)` runs one step."""

    def __init__(self, config: DPORunConfig, runtime: Runtime | None = None):
        self.cfg = cfg = config
        self.runtime = runtime or Runtime()
        self.cfg = cfg = settle_checkpointing(cfg, self.runtime)  # 'auto' -> 'selective' here
        self.amp = autocast_dtype(cfg.precision, self.runtime.device)
        self.average = cfg.loss_type == "ipo"  # IPO on per-token mean log-probs (ppolm/algo/dpo.py)
        self.tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        if self.tokenizer.eos_token_id is None:
            raise ModelLoadError(f"model '{cfg.model}': the tokenizer has no EOS token to end completions with")
        self.train_pairs, self.eval_pairs = self._load_data()
        # after the data (its errors are more specific), before any model loads
        prepare_output_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir,
                           is_main=self.runtime.is_main)
        self.global_batch = cfg.batch_size * self.runtime.world_size
        self.total_steps = total_steps(cfg.max_steps, cfg.epochs, len(self.train_pairs), self.global_batch)
        lm = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
        lm = prepare_model(lm, cfg.lora, task_type="CAUSAL_LM", gradient_checkpointing=cfg.gradient_checkpointing)
        self.scorer = CompletionLogprobs(lm).to(self.runtime.device)
        self.scorer.train()  # from_pretrained returns eval mode; activation checkpointing only acts in train mode
        self.reference: CompletionLogprobs | None = None
        if not cfg.lora.enabled and not cfg.precompute_ref_logprobs:
            # linear weights pre-rounded to the autocast dtype (same forward, half their memory), as PPO's
            ref = frozen_copy(lm, matmul_dtype=None if fsdp_requested() else self.amp)
            self.reference = CompletionLogprobs(ref).to(self.runtime.device)
        self.runtime.shard(self.scorer), self.runtime.shard(self.reference)  # FSDP2 only; before the optimizer
        # Before any weight moves (training, or loading a checkpoint): the policy is still the reference here.
        self.ref_train = self._precompute_train_refs() if cfg.precompute_ref_logprobs else None
        self.eval_refs = [self._reference_logps(collate_pairs(chunk, self.tokenizer.pad_token_id, self.runtime.device))
                          for chunk, _ in self._eval_chunks()]
        self.optim = make_optimization(self.scorer, self.runtime, cfg.optim, self.total_steps)
        self.model, self.optim.optimizer = self.runtime.prepare(self.scorer, self.optim.optimizer,
                                                                max_grad_norm=self.optim.max_grad_norm)
        self.optim.model = self.model
        self.checkpointer = RunCheckpointer(self.runtime, cfg, self.scorer.lm, self.optim, self._fingerprint)
        self.start_step = self.checkpointer.maybe_resume() if cfg.resume else 0
        if self.runtime.is_main:
            save_config(cfg, cfg.output_dir)

    def _load_data(self) -> tuple[list[DPOPair], list[DPOPair]]:
        train, held, self._fingerprint = load_pair_splits(self.cfg, self.tokenizer, self.runtime.is_main,
                                                          tokenize_pairs, "dpo")
        return train, held

    @torch.no_grad()
    def _reference_logps(self, batch: SFTBatch) -> torch.Tensor:
        """log pi_ref of every row of `batch`, (2B,) fp32: the frozen copy, the policy with its LoRA adapters off,
        or (precompute_ref_logprobs, full weights, before any step) the untouched policy itself."""
        lora = self.reference is None and is_lora(self.scorer.lm)
        with self.scorer.lm.disable_adapter() if lora else contextlib.nullcontext():
            model = self.reference if self.reference is not None else self.scorer
            logprobs = model(batch, autocast_dtype=self.amp)
        return sequence_logprobs(logprobs, batch.loss_mask, average=self.average)

    def _precompute_train_refs(self) -> torch.Tensor:
        """(N, 2) reference log-probs (chosen, rejected) of every training pair, scored in micro-batches in file
        order (every process scores all of them, so each can look up the rows step_rows gives it)."""
        size = self.cfg.batch_size // self.cfg.grad_accum_steps
        out = []
        for k in range(0, len(self.train_pairs), size):
            chunk = self.train_pairs[k: k + size]
            ref = self._reference_logps(collate_pairs(chunk, self.tokenizer.pad_token_id, self.runtime.device))
            out.append(torch.stack([ref[: len(chunk)], ref[len(chunk):]], dim=1))
        return torch.cat(out)

    def _eval_chunks(self) -> list[tuple[list[DPOPair], float]]:
        """This process's held-out pairs in forwards of eval_batch_size, each with its weight. Under FSDP2 /
        ZeRO-3 each forward is a collective: every process runs as many, the extra ones on weight-0 pairs."""
        rt, bs = self.runtime, self.cfg.eval_batch_size
        if not self.eval_pairs:
            return []
        mine = self.eval_pairs[rt.rank:: rt.world_size]
        n_forwards = -(-len(self.eval_pairs) // rt.world_size // bs) if rt.params_sharded else -(-len(mine) // bs)
        return [(mine[k: k + bs], 1.0) if k < len(mine) else (self.eval_pairs[:bs], 0.0)
                for k in range(0, n_forwards * bs, bs)]

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step (0-based `step`) over this process's batch_size pairs, in grad_accum_steps parts."""
        cfg, rt = self.cfg, self.runtime
        t0 = time.perf_counter()
        rows = [i for _, i in step_rows(len(self.train_pairs), cfg.seed, step, self.global_batch, rt.rank,
                                        cfg.batch_size)]
        size = cfg.batch_size // cfg.grad_accum_steps
        micro = []
        for k in range(0, cfg.batch_size, size):
            idx = rows[k: k + size]
            batch = collate_pairs([self.train_pairs[i] for i in idx], self.tokenizer.pad_token_id, rt.device)
            # the reference once per batch, before (and outside) the optimizer step's forward/backward
            ref = (self._reference_logps(batch) if self.ref_train is None
                   else self.ref_train[idx].T.reshape(-1).to(rt.device))
            micro.append((batch, ref))
        n_global = float(self.global_batch)

        def loss_fn(mb: tuple[SFTBatch, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            batch, ref = mb
            n = batch.input_ids.shape[0] // 2
            logps = sequence_logprobs(self.model(batch, autocast_dtype=self.amp), batch.loss_mask, self.average)
            losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], cfg.beta, cfg.loss_type,
                                                cfg.label_smoothing)
            # a share of the step's global mean over pairs; world_size undoes DDP's average over processes
            loss = losses.sum() / n_global
            sums = {"loss/dpo": float(loss.detach()), "rewards/chosen": float(chosen.sum()),
                    "rewards/rejected": float(rejected.sum()), "rewards/correct": float((chosen > rejected).sum()),
                    "logps/chosen": float(logps[:n].detach().sum()), "logps/rejected": float(logps[n:].detach().sum()),
                    "tokens": float(batch.attention_mask.sum())}
            return loss * rt.world_size, sums

        result = self.optim.step(micro, loss_fn, where=f"dpo step {step + 1}")
        seconds = time.perf_counter() - t0
        m = {k: float(rt.sum(v)) for k, v in result.metrics.items()}
        chosen, rejected = m["rewards/chosen"] / n_global, m["rewards/rejected"] / n_global
        return {
            "loss/dpo": m["loss/dpo"], "rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/margin": chosen - rejected, "rewards/accuracy": m["rewards/correct"] / n_global,
            "logps/chosen": m["logps/chosen"] / n_global, "logps/rejected": m["logps/rejected"] / n_global,
            "optim/lr": result.lr, "optim/grad_norm": result.grad_norm,
            "optim/nonfinite_skipped_total": float(self.optim.nonfinite_total),
            "time/step_s": seconds, "throughput/tokens_per_s": m["tokens"] / seconds,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """eval/loss, eval/reward_accuracy (chosen reward > rejected; ties count as wrong), eval/margin (mean chosen
        minus rejected implicit reward) over the held-out pairs; the reference's side was scored once at start."""
        if not self.eval_pairs:
            return {}
        cfg, rt = self.cfg, self.runtime
        loss, correct, margin = 0.0, 0.0, 0.0
        self.scorer.eval()
        for (chunk, weight), ref in zip(self._eval_chunks(), self.eval_refs):
            batch = collate_pairs(chunk, self.tokenizer.pad_token_id, rt.device)
            n = len(chunk)
            logps = sequence_logprobs(self.scorer(batch, autocast_dtype=self.amp), batch.loss_mask, self.average)
            losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], cfg.beta, cfg.loss_type,
                                                cfg.label_smoothing)
            loss += weight * float(losses.sum())
            correct += weight * float((chosen > rejected).sum())
            margin += weight * float((chosen - rejected).sum())
        self.scorer.train()
        n_pairs = len(self.eval_pairs)
        accuracy = float(rt.sum(correct)) / n_pairs
        return {"eval/loss": float(rt.sum(loss)) / n_pairs, "eval/reward_accuracy": accuracy,
                "eval/reward_accuracy_se": binomial_se(accuracy, n_pairs),
                "eval/margin": float(rt.sum(margin)) / n_pairs}

    def export_final(self, name: str = "final") -> Path | None:
        """output_dir/`name`: a plain HF model directory (LoRA merged) + tokenizer + ppolm_decoding.json (default
        decoding, the system prompt the pairs were templated with)."""
        out = None
        state = self.runtime.full_state_dict(self.scorer.lm)  # a collective under FSDP2 / ZeRO-3
        if self.runtime.is_main:
            decoding = decoding_record(Decoding(), self.cfg.system_prompt, stage="dpo")
            out = export_model(self.scorer.lm, self.tokenizer, Path(self.cfg.output_dir) / name,
                               {DECODING_FILE: decoding}, state_dict=state)
        self.runtime.wait()
        return out

    def train(self) -> dict[str, float]:
        """Run steps start_step .. total_steps; returns the last step's metrics (with the final evaluation)."""
        return train_loop(self, "dpo", ("loss/dpo", "eval/reward_accuracy", "eval/margin", "time/step_s"))

    def generating_model(self) -> nn.Module:
        """The language model as generation sees it."""
        return self.scorer.lm


def train_dpo(config: DPORunConfig) -> dict[str, float]:
    """Python API: run DPO (or IPO) with `config`; the model is written to output_dir/final."""
    return DPOTrainer(config).train()
