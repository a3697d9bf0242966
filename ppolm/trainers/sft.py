"""Supervised fine-tuning (SFT): maximize log pi(completion | prompt) on demonstrations (InstructGPT step 1,
Ouyang et al. 2022), the usual start of PPO.

    L = -(1/N) sum_{completion tokens t} log pi(y_t | x, y_<t),   N = completion tokens of the whole optimizer
    step (every micro-batch and process), so gradient accumulation 8x1 equals 1x8.

Data: the task's examples (prompt in the chat template, reference completion followed by EOS) or chat
conversations (`chat_data`, or examples carrying `fields['messages']`; loss on the assistant turns through
their EOS). Prompt tokens are context only. LoRA or full weights, bf16 autocast with fp32 log-probs, the
shared optimizer step of `ppolm.update`. Deliberately left out: packing rows together, NEFTune noise.
Launch: `ppolm sft --config configs/sft-tiny.yaml`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ppolm.algo.losses import sft_loss
from ppolm.config import (
    CheckpointConfig, CommonConfig, EvalConfig, GuardConfig, LogConfig, LoraConfig, OptimConfig, TaskConfig,
    check_guard, save_config,
)
from ppolm.data.collate import apply_chat_template, right_pad_collate
from ppolm.data.readers import read_records
from ppolm.errors import DataError, ModelLoadError
from ppolm.models import load_model, load_tokenizer
from ppolm.models.policy import autocast_ctx, last_hidden, token_logprobs
from ppolm.rollout import position_ids_from_mask
from ppolm.plan_report import settle_checkpointing
from ppolm.runtime import Runtime, autocast_dtype
from ppolm.tasks import Example, Task, build_task
from ppolm.tasks.base import DECODING_FILE, decoding_record
from ppolm.trainers.common import (
    RunCheckpointer, export_model, make_optimization, prepare_model, split_held_out, total_steps, train_loop,
)
from ppolm.trainers.resume import data_fingerprint
from ppolm.trainers.run_dir import prepare_output_dir
from ppolm.trainers.prompts import step_rows
from ppolm.trainers.watch import Watch

ROLES = ("system", "user", "assistant")


class SFTRunConfig(CommonConfig):
    """Configuration of `ppolm sft`."""

    task: TaskConfig = Field(default_factory=TaskConfig)
    """The task: its examples (prompt + reference) are the demonstrations; its decoding settings are exported."""
    chat_data: str | None = None
    """JSONL of {"messages": [{"role", "content"}, ...]} conversations to train on instead of the task's examples."""
    batch_size: int = Field(8, ge=1)
    """Rows per optimizer step on each process (global batch = batch_size x processes)."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step whose gradients are summed (must divide batch_size)."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training rows; when set, replaces max_steps (steps = ceil(epochs x rows / global batch))."""
    max_length: int = Field(512, ge=2)
    """Rows longer than this many tokens (prompt + completion) are dropped at load, with a count."""
    use_chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template when it has one (as PPO and serving do)."""
    eval_every: int = Field(0, ge=0)
    """Held-out loss (eval/loss) every N steps (0 = only at the end); the task's own metric is `eval.every`."""
    eval_batch_size: int = Field(8, ge=1)
    """Rows per forward when evaluating."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """LoRA adapters (merged into the exported model)."""
    log: LogConfig = Field(default_factory=LogConfig)
    """Logging."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """The task's metric on held-out examples during training, and best-checkpoint keeping."""
    guard: GuardConfig = Field(default_factory=GuardConfig)
    """Guardrails: stop and roll back when the held-out metric drops or the predictions collapse."""

    @model_validator(mode="after")
    def _check_batches(self) -> "SFTRunConfig":
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"grad_accum_steps ({self.grad_accum_steps}) must divide batch_size ({self.batch_size})")
        if self.guard.max_kl is not None:
            raise ValueError("guard.max_kl watches PPO's KL to the reference; SFT has none")
        check_guard(self.eval, self.guard)
        if self.eval.every and self.chat_data is not None:
            raise ValueError("eval.every runs the task's metric on task examples; chat_data has none")
        return self


@dataclass(frozen=True)
class SFTSequence:
    """One training row: token ids and, per token, 1 when it is a completion token (its prediction is trained)."""

    input_ids: list[int]
    completion_mask: list[int]


def tokenize_example(tokenizer: PreTrainedTokenizerBase, prompt_text: str, completion: str) -> SFTSequence:
    """prompt_text (already templated) as context, then completion + EOS as targets. Tokenized apart so that the
    context is exactly what the model sees when it generates after this prompt."""
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    target = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return SFTSequence(prompt + target, [0] * len(prompt) + [1] * len(target))


def tokenize_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: tuple[str, int]) -> SFTSequence:
    """Render the conversation prefix by prefix and tokenize each new piece: an assistant turn is trained through
    its first EOS (template text after it, e.g. a newline, is context); everything else, including the
    generation prompt that opens an assistant turn, is context. Turns after the last assistant one are dropped."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(where[0], where[1], "messages", "chat conversations need a tokenizer with a chat template")
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids: list[int] = []
    mask: list[int] = []
    done = ""

    def add(text: str, trained: bool) -> None:
        nonlocal done
        if not text.startswith(done):
            raise DataError(where[0], where[1], "messages", "the tokenizer's chat template does not render this "
                            "conversation turn by turn (an earlier part changes when a turn is added)")
        seg = tokenizer(text[len(done):], add_special_tokens=False)["input_ids"]
        end = 0
        if trained:
            eos = tokenizer.eos_token_id
            end = seg.index(eos) + 1 if eos in seg else len(seg)
        ids.extend(seg)
        mask.extend([1] * end + [0] * (len(seg) - end))
        done = text

    for k in range(last + 1):
        if messages[k]["role"] == "assistant":
            add(tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True), False)
        add(tokenizer.apply_chat_template(messages[: k + 1], tokenize=False), messages[k]["role"] == "assistant")
    return SFTSequence(ids, mask)


def read_chat(path: str) -> list[Example]:
    """Read conversations (JSONL, field `messages`: [{role: system|user|assistant, content: str}, ...], the first
    turn not from the assistant, at least one assistant turn) into examples with fields['messages']."""
    out = []
    for rec in read_records(path, required=["messages"], field_types={"messages": list}):
        msgs = rec["messages"]
        for j, m in enumerate(msgs):
            ok = isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            if not ok:
                raise DataError(rec.source, rec.line, f"messages[{j}]",
                                f"expected {{'role': one of {', '.join(ROLES)}, 'content': a string}}")
        if not msgs or msgs[0]["role"] == "assistant" or all(m["role"] != "assistant" for m in msgs):
            raise DataError(rec.source, rec.line, "messages", "needs a first turn from the user or system and at "
                            "least one assistant turn to train on")
        clean = [{"role": m["role"], "content": m["content"]} for m in msgs]
        out.append(Example(prompt=clean[0]["content"], fields={"messages": clean}, source=rec.source, line=rec.line))
    return out


def build_sequences(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, *, system_prompt: str | None,
    use_chat_template: bool, max_length: int, what: str,
) -> tuple[list[SFTSequence], int]:
    """Tokenize every example; returns (rows, number dropped for being longer than max_length)."""
    rows, dropped = [], 0
    for ex in examples:
        if "messages" in ex.fields:
            seq = tokenize_chat(tokenizer, ex.fields["messages"], (ex.source or what, ex.line))
        elif ex.reference is None:
            raise DataError(ex.source or what, ex.line or None, "reference",
                            "SFT needs a reference completion for every example")
        else:
            prompt = apply_chat_template(tokenizer, ex.prompt, system_prompt) if use_chat_template else ex.prompt
            seq = tokenize_example(tokenizer, prompt, ex.reference)
        if len(seq.input_ids) > max_length:
            dropped += 1
            continue
        rows.append(seq)
    return rows, dropped


@dataclass(frozen=True)
class SFTBatch:
    """Right-padded rows. T = longest row.

    input_ids      (B, T)   long   tokens, padded with pad_id
    attention_mask (B, T)   long   1 on real tokens
    labels         (B, T-1) long   the next token at each position (input_ids[:, 1:])
    loss_mask      (B, T-1) float  1 where labels[:, t] is a completion token (its prediction is trained)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor


def collate_sft(rows: list[SFTSequence], pad_id: int, device: torch.device | None = None) -> SFTBatch:
    """Right-pad rows into an SFTBatch (padding carries no loss: its completion mask is 0)."""
    ids, attn = right_pad_collate([r.input_ids for r in rows], pad_id)
    comp, _ = right_pad_collate([r.completion_mask for r in rows], 0)
    return SFTBatch(ids.to(device), attn.to(device), ids[:, 1:].to(device), comp[:, 1:].float().to(device))


class CompletionLogprobs(nn.Module):
    """A causal LM whose forward (the unit data parallelism wraps) returns completion-token log-probs."""

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm = lm

    def forward(self, batch: SFTBatch, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """log pi(labels) at loss_mask positions, 0 elsewhere. -> (B, T-1) fp32.

        The LM head runs in fp32 and only at the N trained positions, (N, V) instead of (B, T, V): prompt
        positions need no vocabulary projection at all.
        """
        with autocast_ctx(autocast_dtype, batch.input_ids.device):  # (the decoder stack: no LM head inside)
            hidden = last_hidden(self.lm, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=position_ids_from_mask(batch.attention_mask))[:, :-1]
        trained = batch.loss_mask > 0
        logprobs = token_logprobs(self.lm, hidden[trained], batch.labels[trained])[0]
        return torch.zeros(batch.loss_mask.shape, dtype=logprobs.dtype, device=logprobs.device).masked_scatter(
            trained, logprobs)


class SFTTrainer:
    """Owns the model, optimizer and data of one SFT run. `train()` runs it; `step(s)` runs one step."""

    def __init__(self, config: SFTRunConfig, task: Task | None = None, runtime: Runtime | None = None,
                 eval_examples: list[Example] | None = None):
        self.cfg = cfg = config
        self.task = task or build_task(cfg.task.name, cfg.task.options)  # options validated before any model loads
        self.task_name = cfg.task.name if task is None else task.name
        self.runtime = runtime or Runtime()
        self.cfg = cfg = settle_checkpointing(cfg, self.runtime)  # 'auto' -> 'selective' here
        self.amp = autocast_dtype(cfg.precision, self.runtime.device)
        self.tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        if self.tokenizer.eos_token_id is None:
            raise ModelLoadError(f"model '{cfg.model}': the tokenizer has no EOS token to end completions with")
        self.train_rows, self.eval_rows, held = self._load_data()
        # after the data (its errors are more specific), before any model loads
        prepare_output_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir,
                           is_main=self.runtime.is_main)
        self.global_batch = cfg.batch_size * self.runtime.world_size
        self.total_steps = total_steps(cfg.max_steps, cfg.epochs, len(self.train_rows), self.global_batch)
        lm = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
        lm = prepare_model(lm, cfg.lora, task_type="CAUSAL_LM", gradient_checkpointing=cfg.gradient_checkpointing)
        self.scorer = CompletionLogprobs(lm).to(self.runtime.device)
        self.scorer.train()  # from_pretrained returns eval mode; activation checkpointing only acts in train mode
        self.runtime.shard(self.scorer)  # FSDP2 only; before the optimizer
        self.optim = make_optimization(self.scorer, self.runtime, cfg.optim, self.total_steps)
        self.model, self.optim.optimizer = self.runtime.prepare(self.scorer, self.optim.optimizer,
                                                                max_grad_norm=self.optim.max_grad_norm)
        self.optim.model = self.model
        fingerprint = data_fingerprint([f"{r.input_ids}{r.completion_mask}" for r in self.train_rows])
        self.checkpointer = RunCheckpointer(self.runtime, cfg, self.scorer.lm, self.optim, fingerprint)
        self.start_step = self.checkpointer.maybe_resume() if cfg.resume else 0
        self.watch = Watch(cfg.eval, cfg.guard, self.task, held if eval_examples is None else eval_examples,
                           self.tokenizer, cfg.output_dir, autocast=self.amp, seed=cfg.seed,
                           is_main=self.runtime.is_main, export=self.export_final, resumed=self.start_step > 0,
                           agree=self.runtime.from_main)
        if self.runtime.is_main:
            save_config(cfg, cfg.output_dir)

    def _load_data(self) -> tuple[list[SFTSequence], list[SFTSequence], list[Example]]:
        """Training rows, held-out rows (eval/loss) and the held-out examples themselves (eval.every)."""
        cfg, t = self.cfg, self.cfg.task
        what = cfg.chat_data or t.data or t.name
        if cfg.chat_data is not None:
            train, held = split_held_out(read_chat(cfg.chat_data), t.eval_fraction, cfg.seed)
        elif t.eval_data is not None:
            train, held = self.task.load_all(t.data), self.task.load_all(t.eval_data)
        else:
            train, held = split_held_out(self.task.load_all(t.data), t.eval_fraction, cfg.seed)
        train, held = train[: t.limit], held[: t.eval_limit]
        kw = dict(system_prompt=self.task.system_prompt, use_chat_template=cfg.use_chat_template,
                  max_length=cfg.max_length)
        train_rows, dropped = build_sequences(train, self.tokenizer, what=what, **kw)
        eval_rows, eval_dropped = build_sequences(held, self.tokenizer, what=what, **kw)
        if dropped or eval_dropped:
            print(f"sft: dropped {dropped} training and {eval_dropped} held-out rows longer than "
                  f"max_length={cfg.max_length} tokens")
        if not train_rows:
            raise DataError(what, None, None, f"no training row fits max_length={cfg.max_length} tokens")
        return train_rows, eval_rows, held

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step (0-based `step`) over this process's batch_size rows, in grad_accum_steps parts."""
        cfg, rt = self.cfg, self.runtime
        t0 = time.perf_counter()
        rows = [self.train_rows[i] for _, i in
                step_rows(len(self.train_rows), cfg.seed, step, self.global_batch, rt.rank, cfg.batch_size)]
        size = cfg.batch_size // cfg.grad_accum_steps
        micro = [collate_sft(rows[k: k + size], self.tokenizer.pad_token_id, rt.device)
                 for k in range(0, cfg.batch_size, size)]
        n_tokens = float(rt.sum(sum(float(mb.loss_mask.sum()) for mb in micro)))

        def loss_fn(mb: SFTBatch) -> tuple[torch.Tensor, dict[str, float]]:
            loss = sft_loss(self.model(mb, autocast_dtype=self.amp), mb.loss_mask, num_tokens=n_tokens)
            # DDP averages gradients over processes; the loss is already a global token mean.
            return loss * rt.world_size, {"loss/sft": float(loss.detach())}

        result = self.optim.step(micro, loss_fn, where=f"sft step {step + 1}")
        seconds = time.perf_counter() - t0
        seen = float(rt.sum(sum(float(mb.attention_mask.sum()) for mb in micro)))
        return {
            "loss/sft": float(rt.sum(result.metrics["loss/sft"])), "optim/lr": result.lr,
            "optim/grad_norm": result.grad_norm, "optim/nonfinite_skipped_total": float(self.optim.nonfinite_total),
            "sft/completion_tokens": n_tokens, "time/step_s": seconds, "throughput/tokens_per_s": seen / seconds,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """eval/loss: completion-token mean NLL over the held-out rows (each process scores its share)."""
        if not self.eval_rows:
            return {}
        rt = self.runtime
        nll, count = 0.0, 0.0
        mine = self.eval_rows[rt.rank:: rt.world_size]
        bs = self.cfg.eval_batch_size
        # the unwrapped module: processes may run different numbers of forwards, so no collectives here; under
        # FSDP2 / ZeRO-3 each forward is a collective: every process runs as many, the extra ones on weight-0 rows
        n_forwards = -(-len(self.eval_rows) // rt.world_size // bs) if rt.params_sharded else -(-len(mine) // bs)
        self.scorer.eval()
        for k in range(0, n_forwards * bs, bs):
            rows, weight = (mine[k: k + bs], 1.0) if k < len(mine) else (self.eval_rows[:bs], 0.0)
            batch = collate_sft(rows, self.tokenizer.pad_token_id, rt.device)
            nll -= weight * float((self.scorer(batch, autocast_dtype=self.amp) * batch.loss_mask).sum())
            count += weight * float(batch.loss_mask.sum())
        self.scorer.train()
        return {"eval/loss": float(rt.sum(nll)) / max(float(rt.sum(count)), 1.0)}

    def export_final(self, name: str = "final") -> Path | None:
        """output_dir/`name` (final, best): HF model directory (LoRA merged) + tokenizer + ppolm_decoding.json."""
        out = None
        state = self.runtime.full_state_dict(self.scorer.lm)  # a collective under FSDP2 / ZeRO-3
        if self.runtime.is_main:
            decoding = decoding_record(self.task.decoding, self.task.system_prompt, task=self.task_name)
            out = export_model(self.scorer.lm, self.tokenizer, Path(self.cfg.output_dir) / name,
                               {DECODING_FILE: decoding}, state_dict=state)
        self.runtime.wait()
        return out

    def train(self) -> dict[str, float]:
        """Run steps start_step .. total_steps; returns the last step's metrics (with the final evaluation)."""
        return train_loop(self, "sft", ("loss/sft", "eval/loss", "time/step_s"), watch=self.watch)

    def generating_model(self) -> nn.Module:
        """The language model as generation sees it (for the task metric during training)."""
        return self.scorer.lm


def train_sft(config: SFTRunConfig, task: Task | None = None,
              eval_examples: list[Example] | None = None) -> dict[str, float]:
    """Python API: run SFT with `config` (optionally on a Task object instead of config.task.name, and with
    held-out examples for `eval.every` other than the split of the task's data)."""
    return SFTTrainer(config, task=task, eval_examples=eval_examples).train()
