"""RLHF-style PPO on any causal LM: a thin loop of named phases.

    rollout -> score -> experience (old log-probs, values, reference log-probs, KL-shaped rewards, advantages)
            -> update (PPO epochs x shuffled minibatches, shared optimizer step) -> log -> checkpoint

Algorithm: Ouyang et al. 2022 (InstructGPT) / Ziegler et al. 2019, with the details of "The N+ Implementation
Details of RLHF with PPO" (docs/implementation-details.md lists each with the function that does it).
The advantage estimator is chosen by `algo.estimator` (ppolm/algo/estimators.py): GAE with a critic, or
critic-free GRPO / RLOO / REINFORCE++ / Dr. GRPO over groups of `rollout.samples_per_prompt` responses, through
the same loop; the policy loss by `algo.policy_loss` (ppolm/algo/policy_losses.py): the clipped surrogate, GSPO
or CISPO. DAPO's dynamic sampling and overlong shaping are switches of `algo` too.
Deliberately left out: PPO-ptx pretraining mix, reward-model training inside the loop (see `ppolm rm`).
Launch: `ppolm ppo --config configs/tiny.yaml`, or `torchrun --nproc_per_node 2 -m ppolm.cli ppo ...`.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
from torch import nn

from ppolm.algo.advantages import shaped_rewards
from ppolm.algo.aggregation import agg_norm
from ppolm.algo.estimators import estimate, get_estimator
from ppolm.algo.kl import make_kl_controller
from ppolm.algo.losses import entropy_bonus, explained_variance, kl_loss, value_loss
from ppolm.algo.policy_losses import get_policy_loss, resolve_clip
from ppolm.config import PPORunConfig, save_config
from ppolm.data.collate import left_pad_collate
from ppolm.models import load_tokenizer
from ppolm.models.policy import lora_merged_for_generation
from ppolm.ops import masked_mean
from ppolm.plan_report import settle_checkpointing
from ppolm.rewards.compose import RewardFn, resolve_reward_function
from ppolm.rewards.overlong import overlong_penalty
from ppolm.rollout import generate
from ppolm.runtime import Runtime, autocast_dtype
from ppolm.sampling import row_uniforms
from ppolm.tasks import Example, Task, build_task
from ppolm.trainers.actor_critic import (build_actor_critic, build_scorer, param_groups, reference_logprobs,
                                         shared_reference)
from ppolm.trainers.common import StepOutput, split_held_out, train_loop
from ppolm.trainers.dynamic_sampling import Round, fill_batch, refill_rows, refill_streams
from ppolm.trainers.micro_batches import generate_in_chunks, over_micro_batches
from ppolm.trainers.oom import micro_batching
from ppolm.trainers.ppo_state import PPOCheckpointer
from ppolm.trainers.run_dir import prepare_output_dir
from ppolm.trainers.prompts import build_prompts, step_rows
from ppolm.trainers.watch import Watch
from ppolm.types import Experience, Rollout
from ppolm.update import Optimization, StepResult


# logprobs, values (None without a critic), entropy: (B, R) each
PolicyOut = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class PPOTrainer:
    """Owns the models, optimizer and data of one PPO run. `train()` runs it; `step(s)` runs one step."""

    def __init__(self, config: PPORunConfig, reward_fn: RewardFn | list[RewardFn] | None = None,
                 runtime: Runtime | None = None, task: Task | None = None,
                 eval_examples: list[Example] | None = None):
        self.cfg = cfg = config
        # options validated before any model loads; a Task object (the pipeline's train split) overrides the name
        self.task = task or build_task(cfg.task.name, cfg.task.options)
        extra_fns = [resolve_reward_function(f.name, f.kwargs) for f in cfg.reward.functions]
        self.runtime = runtime or Runtime()
        prepare_output_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir,
                           is_main=self.runtime.is_main)
        self.amp = autocast_dtype(cfg.precision, self.runtime.device)
        self.tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        examples = self.task.load_all(cfg.task.data)
        if cfg.eval.every and eval_examples is None:  # held-out rows never reach the rollout
            if cfg.task.eval_data is not None:
                eval_examples = self.task.load_all(cfg.task.eval_data)
            else:
                examples, eval_examples = split_held_out(examples, cfg.task.eval_fraction, cfg.seed)
        examples = examples[: cfg.task.limit]
        self.prompts = build_prompts(
            examples, self.tokenizer, system_prompt=self.task.system_prompt,
            use_chat_template=cfg.rollout.use_chat_template, max_prompt_tokens=cfg.rollout.max_prompt_tokens,
        )
        if not self.prompts.examples:
            from ppolm.errors import DataError

            raise DataError(cfg.task.data or cfg.task.name, None, None,
                            f"no prompt fits rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}")
        self.estimator = get_estimator(cfg.algo.estimator)
        self.policy_loss = get_policy_loss(cfg.algo.policy_loss)
        # null clip bounds and loss.agg: the policy loss's paper values, else ppo.clip_eps / the estimator's paper
        # default (recorded as comments in output_dir/config.yaml)
        self.clip_low, self.clip_high = resolve_clip(cfg.algo.policy_loss, cfg.ppo.clip_eps, cfg.algo.clip_eps_low,
                                                     cfg.algo.clip_eps_high)
        self.loss_agg = cfg.loss.agg or self.policy_loss.loss_agg or self.estimator.loss_agg
        # 'auto' checkpointing: the memory plan decides before any model loads (ppolm.plan_report)
        self.cfg = cfg = settle_checkpointing(cfg, self.runtime, max(map(len, self.prompts.token_ids)))
        self.actor, self.reference = build_actor_critic(cfg, self.amp)
        self.micro, self.oom = micro_batching(cfg, self.runtime, self.actor)  # sizes halved by OOM recovery
        self.actor.to(self.runtime.device)
        if self.reference is not None:
            self.reference.to(self.runtime.device)
        self.runtime.shard(self.actor), self.runtime.shard(self.reference)  # FSDP2 only; before the optimizer
        self.scorer = build_scorer(cfg, reward_fn, extra_fns, self.task, self.runtime.device, self.amp)
        n_minibatches = cfg.rollout.batch_size * cfg.rollout.samples_per_prompt // cfg.ppo.minibatch_size
        self.optim = Optimization(
            self.actor, self.runtime, param_groups=param_groups(self.actor, cfg.optim.lr, cfg.optim.critic_lr),
            betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
            warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.max_steps * cfg.ppo.epochs * n_minibatches,
            schedule=cfg.optim.schedule, max_grad_norm=cfg.optim.max_grad_norm,
            max_nonfinite_steps=cfg.optim.max_nonfinite_steps,
        )
        self.model, self.optim.optimizer = self.runtime.prepare(self.actor, self.optim.optimizer,
                                                                max_grad_norm=self.optim.max_grad_norm)
        self.optim.model = self.model
        self.kl_ctl = make_kl_controller(cfg.kl.coef, cfg.kl.adaptive, cfg.kl.target, cfg.kl.horizon)
        self.global_batch = cfg.rollout.batch_size * self.runtime.world_size  # prompts per step
        self.global_rows = self.global_batch * cfg.rollout.samples_per_prompt  # responses per step
        self.checkpointer = PPOCheckpointer(self)
        self.start_step = self.checkpointer.maybe_resume() if cfg.resume else 0
        self.watch = Watch(cfg.eval, cfg.guard, self.task, eval_examples or [], self.tokenizer, cfg.output_dir,
                           autocast=self.amp, seed=cfg.seed, is_main=self.runtime.is_main,
                           export=self.checkpointer.export_final, resumed=self.start_step > 0,
                           agree=self.runtime.from_main, reference=shared_reference(
                               self.reference, cfg.model, self.task, self.runtime.world_size))
        if self.runtime.is_main:
            path = save_config(cfg, cfg.output_dir)
            a = cfg.algo
            with path.open("a", encoding="utf-8") as f:  # comments: a rerun of this file still resolves them
                if cfg.loss.agg is None:
                    by = (f"algo.policy_loss '{a.policy_loss}'" if self.policy_loss.loss_agg
                          else f"algo.estimator '{self.estimator.name}'")
                    f.write(f"# loss.agg null resolved to '{self.loss_agg}' ({by})\n")
                if a.policy_loss != "ppo" and (a.clip_eps_low is None or a.clip_eps_high is None):
                    f.write(f"# algo.clip_eps_low / clip_eps_high resolved to {self.clip_low:g} / {self.clip_high:g} "
                            f"(algo.policy_loss '{a.policy_loss}')\n")

    # ---- phases -------------------------------------------------------------------------------------------
    def rollout(self, step: int, round_: int = 0) -> tuple[Rollout, list, list[int]]:
        """Sample k = samples_per_prompt responses for each of this process's prompts of `step`; the k rows of a
        prompt are contiguous, and a process always holds whole groups. round_ >= 1: a refill round of dynamic
        sampling, with prompts and random streams of its own (ppolm.trainers.dynamic_sampling)."""
        r = self.cfg.rollout
        k = r.samples_per_prompt
        if round_ == 0:
            rows = step_rows(len(self.prompts.examples), self.cfg.seed, step, self.global_batch,
                             self.runtime.rank, r.batch_size)
            # sample j of the prompt at global position pos draws from stream pos * k + j (k = 1: stream pos)
            streams = [pos * k + j for pos, _ in rows for j in range(k)]
        else:
            rows = refill_rows(len(self.prompts.examples), self.cfg.seed, step, round_, self.global_batch,
                               self.runtime.rank, r.batch_size)
            streams = refill_streams(rows, round_, self.global_batch, k)
        idx = [i for _, i in rows for _ in range(k)]
        uniforms = row_uniforms(self.cfg.seed, step, streams, r.max_new_tokens)
        self.actor.eval()  # rollout and scoring run in eval mode; update() switches to train mode
        def sample() -> Rollout:  # micro.rollout_prompts prompts per generate call (OOM recovery halves it)
            with lora_merged_for_generation(self.actor.policy, self.amp):  # (no-op without LoRA)
                return generate_in_chunks(self._generate, [self.prompts.token_ids[i] for _, i in rows], uniforms,
                                          [self.prompts.texts[i] for i in idx], k=k,
                                          per_call=self.micro.rollout_prompts, collate=left_pad_collate,
                                          pad_id=self.tokenizer.pad_token_id)
        return self.oom.run("rollout", sample), [self.prompts.examples[i] for i in idx], idx

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, uniforms: torch.Tensor, prompts: list[str]) -> Rollout:
        r = self.cfg.rollout
        return generate(
            self.actor.policy, self.tokenizer, ids.to(self.runtime.device), mask.to(self.runtime.device), uniforms,
            max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens, temperature=r.temperature,
            top_k=r.top_k, top_p=r.top_p,
            stop=r.stop, autocast_dtype=self.amp, prompts=prompts, samples_per_prompt=r.samples_per_prompt,
            # FSDP2, ZeRO-3: every decode step gathers the sharded weights, so all processes step until the last
            # is done
            all_finished=((lambda done: not self.runtime.broadcast_flag(not done)) if self.runtime.params_sharded
                          else None),
        )

    def score(self, rollout: Rollout, examples) -> tuple[torch.Tensor, dict[str, float]]:
        """Sequence scores (B,) from the reward functions / model, normalized and clipped, with the missing-EOS
        and overlong penalties."""
        scores, _, metrics = self._score(rollout, examples)
        return scores, metrics

    def _score(self, rollout: Rollout, examples) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """score(), plus the raw scores (B,) with non-finite ones as 0 (what dynamic sampling compares)."""
        raw = self.scorer.raw_scores(rollout.prompts, rollout.completions, self.task.row_fields(examples))
        all_raw = self.runtime.gather_floats(raw)
        scores, stats = self.scorer.finish(raw, rollout.ended, all_raw)
        a, extra = self.cfg.algo, {}
        if a.overlong_buffer:  # DAPO's overlong shaping, added after normalisation like the EOS penalty
            penalty = overlong_penalty(rollout.response_mask.sum(-1).cpu(), self.cfg.rollout.max_new_tokens,
                                       a.overlong_buffer, a.overlong_penalty)
            scores = scores + penalty
            extra["reward/overlong_penalty_mean"] = float(self.runtime.sum(penalty.sum())) / self.global_rows
        finite = all_raw[torch.isfinite(all_raw)]
        return scores.to(self.runtime.device), torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw)), {
            "reward/mean": float(finite.mean()) if finite.numel() else float("nan"),
            "reward/std": float(finite.std()) if finite.numel() > 1 else 0.0,
            "reward/score_mean": float(self.runtime.sum(scores.sum()) / self.global_rows),
            "reward/nonfinite_count": float(self.runtime.sum(stats.nonfinite)),
            "reward/eos_penalized_count": float(self.runtime.sum(stats.eos_penalized)),
            "reward/all_equal": float(finite.numel() > 0 and bool((finite == finite[0]).all())),
            **extra,
        }

    def dynamic_sampling(self, step: int, first: Round) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
        """DAPO's dynamic sampling (ppolm.trainers.dynamic_sampling): keep the groups of `first` (the step's
        regular rows) whose raw scores differ, refill rounds until every process holds batch_size of them or
        algo.dynamic_sampling_max_rounds rounds have run; returns the batch, its scores and the metrics."""
        def sample(round_: int) -> Round:
            rollout, examples, _ = self.rollout(step, round_)
            scores, raw, _ = self._score(rollout, examples)  # the reward/* metrics stay those of the regular rows
            return Round(rollout, scores, raw)

        return fill_batch(first, sample, groups=self.cfg.rollout.batch_size,
                          group_size=self.cfg.rollout.samples_per_prompt,
                          max_rounds=self.cfg.algo.dynamic_sampling_max_rounds, any_short=self.runtime.broadcast_flag,
                          global_sum=lambda x: float(self.runtime.sum(x)), pad_id=self.tokenizer.pad_token_id)

    def fused_first_forward(self, attention_mask: torch.Tensor | None = None) -> bool:
        """True when the update is one optimizer step over the whole batch in one micro-batch (packed: when the
        batch's attention_mask (B, T) fits ppo.max_tokens): its forward, taken before any weight changes, gives
        exactly the old log-probs and values, so the separate no-grad forward is skipped."""
        p, r, m = self.cfg.ppo, self.cfg.rollout, self.micro
        rows = r.batch_size * r.samples_per_prompt
        one = len(m.split(attention_mask)) == 1 if m.packed and attention_mask is not None else m.rows >= rows
        return p.fuse_first_forward and p.epochs == 1 and p.minibatch_size == rows and one

    @torch.no_grad()
    def experience(self, rollout: Rollout, scores: torch.Tensor,
                   policy_out: PolicyOut | None = None) -> tuple[Experience, dict[str, float]]:
        """Old log-probs and values (one forward in head mode, or `policy_out` of the fused update forward),
        reference log-probs, shaped rewards (KL in the reward unless kl.in = loss), the estimator's advantages."""
        ids, attn, resp, mask = rollout.input_ids, rollout.attention_mask, rollout.response_ids, rollout.response_mask
        batches, packed = self.micro.split(attn), self.micro.packed  # micro-batches of the scoring pass
        if policy_out is not None:
            old_logprobs, old_values, entropy = (x.detach() if x is not None else None for x in policy_out)
        else:
            self.actor.eval()
            old_logprobs, old_values, entropy = over_micro_batches(lambda b: self.actor(
                ids[b], attn[b], resp[b], need_entropy=True, autocast_dtype=self.amp, packed=packed), batches)
        if self.reference is None and not self.actor.is_lora():
            ref_logprobs = old_logprobs  # KL penalty off for the whole run: the reference forward is skipped
        else:
            ref_logprobs, = over_micro_batches(lambda b: (reference_logprobs(
                self.actor, self.reference, ids[b], attn[b], resp[b], self.amp, packed=packed),), batches)
        p, est = self.cfg.ppo, self.estimator
        reward_kl_coef = self.kl_ctl.value if self.cfg.kl.in_ == "reward" else 0.0
        rewards, kl = shaped_rewards(scores, old_logprobs, ref_logprobs, mask, reward_kl_coef, self.cfg.kl.estimator)
        advantages, returns = estimate(est.name, rewards, old_values, mask,
                                       group_size=self.cfg.rollout.samples_per_prompt, gamma=p.gamma, lam=p.lam)
        if est.whiten == "always" or (est.whiten == "config" and p.whiten_advantages):
            advantages = self._global_whiten(advantages, mask)
        if old_values is None:  # critic-free: the record keeps its shape, the value loss is never computed
            old_values = torch.zeros_like(old_logprobs)
        exp = Experience(ids, attn, mask, old_logprobs, ref_logprobs, old_values, scores, rewards, kl, advantages, returns)
        n_rows = self.global_rows
        kl_seq = float(self.runtime.sum(kl.sum())) / n_rows
        lengths = mask.sum(-1)
        metrics = {
            "objective/kl": kl_seq,
            "objective/kl_coef": self.kl_ctl.value,
            "objective/non_score_reward": float(self.runtime.sum((-reward_kl_coef * kl).sum())) / n_rows,
            "policy/entropy": float(self.runtime.sum((entropy * mask).sum()) / self.runtime.sum(mask.sum()).clamp(min=1)),
            "response/length_mean": float(self.runtime.sum(lengths.sum())) / n_rows,
            "response/eos_rate": float(self.runtime.sum(rollout.ended.float().sum())) / n_rows,
            # an EOS-only response is one token long but says nothing: it counts as empty
            "response/empty_count": float(self.runtime.sum(
                ((lengths == 0) | ((lengths == 1) & rollout.ended)).float().sum())),
            "response/one_token_count": float(self.runtime.sum((lengths == 1).float().sum())),
        }
        if est.needs_critic:
            metrics["val/mean"] = float(masked_mean(old_values, mask))
            metrics["val/explained_variance"] = float(explained_variance(old_values, returns, mask))
        return exp, metrics

    def _global_whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Whiten with mean/variance over the response tokens of every process (Bessel-corrected)."""
        n = self.runtime.sum(mask.sum())
        mean = self.runtime.sum((x * mask).sum()) / n.clamp(min=1)
        var = self.runtime.sum((((x - mean.float()) ** 2) * mask).sum()) / (n - 1).clamp(min=1)
        return ((x - mean.float()) * torch.rsqrt(var.float() + 1e-8)) * mask

    def update(self, exp: Experience, step: int, policy_out: PolicyOut | list | None = None) -> dict[str, float]:
        """PPO epochs x shuffled minibatches, each one shared optimizer step with gradient accumulation.

        policy_out: the fused first forward (with grad) over the whole batch, used by the first optimizer step,
        or a one-item list holding it (emptied here, so that an out-of-memory retry frees its graph).
        """
        p, world = self.cfg.ppo, self.runtime.world_size
        self.actor.train()
        group, agg, max_len = self.cfg.rollout.samples_per_prompt, self.loss_agg, self.cfg.rollout.max_new_tokens
        fused = [policy_out.pop() if isinstance(policy_out, list) else policy_out]
        sums: dict[str, float] = {}
        n_tokens_total = 0.0
        # sums over the minibatches of their global normalisers: of the policy terms (loss.agg: tokens, responses,
        # or responses x max_new_tokens) and of the value loss (tokens); they weight the loss/* metrics
        norm_total = 0.0
        tokens_norm_total = 0.0
        stopped_early = 0.0
        steps_taken = 0  # optimizer steps actually applied (early stop and skipped non-finite steps excluded)
        for epoch in range(p.epochs):
            gen = torch.Generator().manual_seed((self.cfg.seed * 1009 + step) * 101 + epoch)
            # shuffle whole groups: the k rows of a prompt stay contiguous and in one minibatch (k = 1: rows)
            groups = torch.randperm(len(exp) // group, generator=gen)
            order = (groups.unsqueeze(1) * group + torch.arange(group)).flatten()
            epoch_kl = []
            for mb_index in order.split(p.minibatch_size):
                mb = exp.select(mb_index)
                # Every micro-batch (and process) divides by the whole minibatch's normaliser, so their losses add
                # up to the minibatch loss in every loss.agg mode (ppolm.algo.aggregation).
                mb_tokens = float(self.runtime.sum(mb.response_mask.sum()))
                mb_norm = mb_tokens if agg == "token_mean" else float(
                    self.runtime.sum(agg_norm(agg, mb.response_mask, max_len)))
                def attempt() -> StepResult:  # split on each try (OOM recovery may have halved the micro-batch);
                    # the fused forward (first optimizer step, first try, one micro-batch) is popped: a retry frees it
                    loss_fn = functools.partial(self.minibatch_loss, fused=fused.pop() if fused else None,
                                                index=mb_index, norm=mb_norm, tokens=mb_tokens)
                    micro = [mb.select(b) for b in self.micro.split(mb.attention_mask)]
                    return self.optim.step(micro, loss_fn, where=f"step {step + 1}")
                result = self.oom.run("update", attempt)
                for k, v in result.metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                if not result.skipped:
                    sums["optim/grad_norm"] = sums.get("optim/grad_norm", 0.0) + result.grad_norm
                    steps_taken += 1
                n_tokens_total += float(mb.response_mask.sum())
                norm_total += mb_norm
                tokens_norm_total += mb_tokens
                epoch_kl.append(result.metrics.get("policy/approx_kl", 0.0) / max(float(mb.response_mask.sum()), 1.0))
            if p.target_kl is not None:
                mean_kl = float(self.runtime.sum(sum(epoch_kl) / max(len(epoch_kl), 1))) / world
                if mean_kl > p.target_kl:
                    stopped_early = 1.0
                    break
        out = {}
        for k, v in sums.items():
            if k.startswith("loss/"):
                total = tokens_norm_total if k == "loss/value" else norm_total
                out[k] = float(self.runtime.sum(v)) / max(total, 1.0)
            elif k == "optim/grad_norm":
                out[k] = v / steps_taken
            else:
                out[k] = float(self.runtime.sum(v)) / max(float(self.runtime.sum(n_tokens_total)), 1.0)
        out.setdefault("optim/grad_norm", float("nan"))  # every step skipped: no norm to report
        out["optim/lr"] = self.optim.scheduler.get_last_lr()[0]
        out["optim/nonfinite_skipped_total"] = float(self.optim.nonfinite_total)
        out["policy/early_stopped"] = stopped_early
        # The next optimizer step starts from zero gradients anyway; freed now, a full fp32 copy of them (0.54 GB
        # on the embedded model) no longer sits beside the next rollout and the fused forward's activations,
        # where the step's peak memory is.
        self.actor.zero_grad(set_to_none=True)
        return out

    def minibatch_loss(self, m: Experience, *, fused: PolicyOut | None, index: torch.Tensor, norm: float,
                       tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The PPO loss of micro-batch `m` of a minibatch (its rows `index` of the step's batch) and its metric
        sums. norm: the minibatch's global normaliser of the policy terms (loss.agg); tokens: its global response
        token count (the value loss's). fused: the fused first forward over the whole batch, or None to run the
        forward here."""
        p = self.cfg.ppo
        if fused is not None:  # the forward already ran on these weights
            logprobs, values, entropy = (x[index] if x is not None else None for x in fused)
        else:
            logprobs, values, entropy = self.model(
                m.input_ids, m.attention_mask, m.input_ids[:, -m.response_mask.shape[1]:],
                need_entropy=p.ent_coef > 0, autocast_dtype=self.amp, packed=self.micro.packed,
            )
        pl = self.policy_loss.fn(logprobs, m.old_logprobs, m.advantages, m.response_mask, clip_low=self.clip_low,
                                 clip_high=self.clip_high, log_ratio_clamp=p.log_ratio_clamp, norm=norm,
                                 agg=self.loss_agg)
        loss = pl.loss
        ntok = float(m.response_mask.sum())
        metrics = {
            "loss/policy": float(pl.loss.detach()) * norm,
            "policy/clipfrac": float(pl.clipfrac) * ntok, "policy/approx_kl": float(pl.approx_kl) * ntok,
            "policy/ratio_mean": float(pl.ratio_mean) * ntok,
        }
        if self.estimator.needs_critic:
            vl = value_loss(values, m.old_values, m.returns, m.response_mask, p.value_clip_eps, num_tokens=tokens)
            loss = loss + p.vf_coef * vl.loss
            metrics["loss/value"] = float(vl.loss.detach()) * tokens
            metrics["val/clipfrac"] = float(vl.clipfrac) * ntok
        if self._kl_in_loss():
            kll = kl_loss(logprobs, m.ref_logprobs, m.response_mask, self.cfg.kl.estimator, norm, self.loss_agg)
            loss = loss + self.kl_ctl.value * kll
            metrics["loss/kl"] = float(kll.detach()) * norm
        if p.ent_coef > 0:
            loss = loss - p.ent_coef * entropy_bonus(entropy, m.response_mask, norm, self.loss_agg)
        # DDP averages gradients over processes; the loss is already normalised globally.
        return loss * self.runtime.world_size, metrics

    def _kl_in_loss(self) -> bool:
        """kl.in = loss with a KL penalty that is on for the run (the reference is then scored)."""
        kl = self.cfg.kl
        return kl.in_ == "loss" and (kl.coef > 0 or kl.adaptive)

    # ---- loop ---------------------------------------------------------------------------------------------
    def step(self, step: int) -> StepOutput:
        """One PPO step (0-based `step`)."""
        t0, retries = time.perf_counter(), self.oom.retries
        rollout, examples, idx = self.rollout(step)
        t1 = time.perf_counter()
        scores, raw, reward_metrics = self._score(rollout, examples)
        t2 = t_ds = time.perf_counter()
        if self.cfg.algo.dynamic_sampling:
            rollout, scores, ds_metrics = self.dynamic_sampling(step, Round(rollout, scores, raw))
            t_ds = time.perf_counter()
            reward_metrics.update(ds_metrics, **{"time/dynamic_sampling_s": t_ds - t2})
        exp, exp_metrics, fused = self.oom.run("score", lambda: self._experience_phase(rollout, scores))
        t3 = time.perf_counter()
        upd_metrics = self.update(exp, step, fused)
        t4 = time.perf_counter()
        self.kl_ctl.update(exp_metrics["objective/kl"], self.global_rows)
        n_tokens = float(self.runtime.sum(rollout.response_mask.sum() + rollout.prompt_mask.sum()))
        metrics = {
            **reward_metrics, **exp_metrics, **upd_metrics, **self.oom.step_metrics(retries),
            "time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/experience_s": t3 - t_ds,
            "time/update_s": t4 - t3, "time/step_s": t4 - t0, "throughput/tokens_per_s": n_tokens / (t4 - t0),
        }
        samples = [
            {"prompt": rollout.prompts[i], "completion": rollout.completions[i], "score": float(scores[i])}
            for i in range(min(4, len(rollout.completions)))
        ]
        return StepOutput(metrics, samples)

    def _experience_phase(self, rollout: Rollout, scores: torch.Tensor) -> tuple[Experience, dict, list]:
        """experience(), and the fused first forward (the update's own, with grad) when it applies, in a one-item
        list that update() empties: no frame of step() keeps its graph alive through an out-of-memory retry."""
        policy_out = None
        if self.fused_first_forward(rollout.attention_mask):
            # The update's forward: train mode (gradient checkpointing is active only there), whatever mode
            # from_pretrained or the rollout left the model in.
            self.actor.train()
            # (the entropy is kept with its graph only when the loss has an entropy bonus; else it is a metric)
            policy_out = self.model(rollout.input_ids, rollout.attention_mask, rollout.response_ids,
                                    need_entropy=True, autocast_dtype=self.amp,
                                    entropy_grad=self.cfg.ppo.ent_coef > 0, packed=self.micro.packed)
        return *self.experience(rollout, scores, policy_out), [policy_out]

    # What train_loop (shared with SFT and RM) reads besides `checkpointer`: the step count, an evaluation, the export
    @property
    def total_steps(self) -> int:
        return self.cfg.max_steps

    def evaluate(self) -> dict[str, float]:
        """No loss-based evaluation in PPO: its held-out check is the task metric of `watch` (eval.every)."""
        return {}

    def export_final(self) -> Path | None:
        return self.checkpointer.export_final()

    def generating_model(self) -> nn.Module:
        return self.actor.policy

    def train(self) -> dict[str, float]:
        """Run steps start_step .. max_steps; returns the last step's metrics."""
        return train_loop(self, "ppo", ("reward/mean", "objective/kl", "time/step_s"), watch=self.watch)


def train_ppo(config: PPORunConfig, reward_fn: RewardFn | list[RewardFn] | None = None,
              task: Task | None = None, eval_examples: list[Example] | None = None) -> dict[str, float]:
    """Python API: run PPO with `config`; optional extra reward function(s) (prompts, completions, **fields),
    an optional Task object used instead of config.task.name, and optional held-out examples for
    `eval.every` (default: task.eval_data, or eval_fraction of the task's data split off)."""
    return PPOTrainer(config, reward_fn=reward_fn, task=task, eval_examples=eval_examples).train()

