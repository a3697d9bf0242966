"""RLHF-style PPO on any causal LM: a thin loop of named phases.

    rollout -> score -> experience (old log-probs, values, reference log-probs, KL-shaped rewards, GAE)
            -> update (PPO epochs x shuffled minibatches, shared optimizer step) -> log -> checkpoint

Algorithm: Ouyang et al. 2022 (InstructGPT) / Ziegler et al. 2019, with the details of "The N+ Implementation
Details of RLHF with PPO" (docs/implementation-details.md lists each with the function that does it).
Deliberately left out: PPO-ptx pretraining mix, reward-model training inside the loop (see `ppolm rm`).
Launch: `ppolm ppo --config configs/tiny.yaml`, or `torchrun --nproc_per_node 2 -m ppolm.cli ppo ...`.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from ppolm.algo.advantages import gae, shaped_rewards
from ppolm.algo.kl import make_kl_controller
from ppolm.algo.losses import entropy_bonus, explained_variance, policy_loss, value_loss
from ppolm.config import PPORunConfig, save_config
from ppolm.data.collate import left_pad_collate
from ppolm.logger import MetricsLogger
from ppolm.models import load_model, load_tokenizer
from ppolm.ops import masked_mean
from ppolm.rewards.compose import RewardFn, Scorer, resolve_reward_function
from ppolm.rollout import generate
from ppolm.runtime import Runtime, autocast_dtype
from ppolm.sampling import row_uniforms
from ppolm.tasks import Example, Task, build_task
from ppolm.trainers.actor_critic import build_actor_critic, param_groups, reference_logprobs
from ppolm.trainers.common import split_held_out
from ppolm.trainers.ppo_state import PPOCheckpointer
from ppolm.trainers.prompts import build_prompts, step_rows
from ppolm.trainers.watch import Watch
from ppolm.types import Experience, Rollout
from ppolm.update import Optimization


PolicyOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # logprobs, values, entropy: (B, R) each


@dataclass
class StepOutput:
    """Metrics of one step and the samples to show."""

    metrics: dict[str, float]
    samples: list[dict]


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
        self.actor, self.reference = build_actor_critic(cfg, self.amp)
        self.actor.to(self.runtime.device)
        if self.reference is not None:
            self.reference.to(self.runtime.device)
        self.runtime.shard(self.actor), self.runtime.shard(self.reference)  # FSDP2 only; before the optimizer
        self.scorer = self._build_scorer(reward_fn, extra_fns)
        n_minibatches = cfg.rollout.batch_size // cfg.ppo.minibatch_size
        self.optim = Optimization(
            self.actor, self.runtime, param_groups=param_groups(self.actor, cfg.optim.lr, cfg.optim.critic_lr),
            betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
            warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.max_steps * cfg.ppo.epochs * n_minibatches,
            schedule=cfg.optim.schedule, max_grad_norm=cfg.optim.max_grad_norm,
            max_nonfinite_steps=cfg.optim.max_nonfinite_steps,
        )
        self.model, self.optim.optimizer = self.runtime.prepare(self.actor, self.optim.optimizer)
        self.optim.model = self.model
        self.kl_ctl = make_kl_controller(cfg.kl.coef, cfg.kl.adaptive, cfg.kl.target, cfg.kl.horizon)
        self.global_batch = cfg.rollout.batch_size * self.runtime.world_size
        self.state = PPOCheckpointer(self)
        self.start_step = self.state.maybe_resume() if cfg.resume else 0
        self.watch = Watch(cfg.eval, cfg.guard, self.task, eval_examples or [], self.tokenizer, cfg.output_dir,
                           autocast=self.amp, seed=cfg.seed, is_main=self.runtime.is_main,
                           export=self.state.export_final, resumed=self.start_step > 0)
        if self.runtime.is_main:
            save_config(cfg, cfg.output_dir)
        # Everything allocated so far lives for the whole run: freeze it out of the collector's scans, so
        # automatic collections stay cheap and no per-step gc.collect() is needed.
        gc.collect()
        gc.freeze()

    def _build_scorer(self, reward_fn, extra_fns) -> Scorer:
        cfg = self.cfg.reward
        fns: list[tuple[RewardFn, float]] = []
        if reward_fn is not None:
            fns += [(f, 1.0) for f in (reward_fn if isinstance(reward_fn, list) else [reward_fn])]
        fns += [(fn, f.weight) for fn, f in zip(extra_fns, cfg.functions)]
        if not fns and cfg.model is None:
            fns = self.task.reward_functions()
        rm, rm_tok = None, None
        if cfg.model is not None:
            rm = load_model(cfg.model, kind="seqcls", trust_remote_code=self.cfg.trust_remote_code,
                            precision="bf16" if self.amp == torch.bfloat16 else "fp32").to(self.runtime.device)
            rm.requires_grad_(False)
            rm.eval()
            rm_tok = load_tokenizer(cfg.model, trust_remote_code=self.cfg.trust_remote_code)
        return Scorer(fns, rm, rm_tok, cfg.model_weight, cfg.normalize, cfg.clip, cfg.missing_eos_penalty, self.amp)

    # ---- phases -------------------------------------------------------------------------------------------
    def rollout(self, step: int) -> tuple[Rollout, list, list[int]]:
        """Sample responses for this process's rows of `step`."""
        rows = step_rows(len(self.prompts.examples), self.cfg.seed, step, self.global_batch,
                         self.runtime.rank, self.cfg.rollout.batch_size)
        idx = [i for _, i in rows]
        ids, mask = left_pad_collate([self.prompts.token_ids[i] for i in idx], self.tokenizer.pad_token_id)
        r = self.cfg.rollout
        uniforms = row_uniforms(self.cfg.seed, step, [pos for pos, _ in rows], r.max_new_tokens)
        policy = self.actor.policy
        was_training = policy.training
        policy.eval()
        out = generate(
            policy, self.tokenizer, ids.to(self.runtime.device), mask.to(self.runtime.device), uniforms,
            max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens, temperature=r.temperature,
            top_k=r.top_k, top_p=r.top_p,
            stop=r.stop, autocast_dtype=self.amp, prompts=[self.prompts.texts[i] for i in idx],
        )
        policy.train(was_training)
        return out, [self.prompts.examples[i] for i in idx], idx

    def score(self, rollout: Rollout, examples) -> tuple[torch.Tensor, dict[str, float]]:
        """Sequence scores (B,) from the reward functions / model, normalized and clipped."""
        raw = self.scorer.raw_scores(rollout.prompts, rollout.completions, self.task.row_fields(examples))
        all_raw = self.runtime.gather_floats(raw)
        scores, stats = self.scorer.finish(raw, rollout.ended, all_raw)
        finite = all_raw[torch.isfinite(all_raw)]
        return scores.to(self.runtime.device), {
            "reward/mean": float(finite.mean()) if finite.numel() else float("nan"),
            "reward/std": float(finite.std()) if finite.numel() > 1 else 0.0,
            "reward/score_mean": float(self.runtime.sum(scores.sum()) / self.global_batch),
            "reward/nonfinite_count": float(self.runtime.sum(stats.nonfinite)),
            "reward/eos_penalized_count": float(self.runtime.sum(stats.eos_penalized)),
            "reward/all_equal": float(finite.numel() > 0 and bool((finite == finite[0]).all())),
        }

    def fused_first_forward(self) -> bool:
        """True when the update is one optimizer step over the whole batch: its forward, taken before any weight
        changes, gives exactly the old log-probs and values, so the separate no-grad forward is skipped."""
        p = self.cfg.ppo
        return (p.fuse_first_forward and p.epochs == 1 and p.grad_accum_steps == 1
                and p.minibatch_size == self.cfg.rollout.batch_size)

    @torch.no_grad()
    def experience(self, rollout: Rollout, scores: torch.Tensor,
                   policy_out: PolicyOut | None = None) -> tuple[Experience, dict[str, float]]:
        """Old log-probs and values (one forward in head mode, or `policy_out` of the fused update forward),
        reference log-probs, shaped rewards, GAE."""
        ids, attn, resp, mask = rollout.input_ids, rollout.attention_mask, rollout.response_ids, rollout.response_mask
        if policy_out is not None:
            old_logprobs, old_values, entropy = (x.detach() for x in policy_out)
        else:
            self.actor.eval()
            old_logprobs, old_values, entropy = self.actor(ids, attn, resp, need_entropy=True, autocast_dtype=self.amp)
            self.actor.train()
        if self.reference is None and not self.actor.is_lora():
            ref_logprobs = old_logprobs  # KL penalty off for the whole run: the reference forward is skipped
        else:
            ref_logprobs = reference_logprobs(self.actor, self.reference, ids, attn, resp, self.amp)
        p = self.cfg.ppo
        rewards, kl = shaped_rewards(scores, old_logprobs, ref_logprobs, mask, self.kl_ctl.value, self.cfg.kl.estimator)
        advantages, returns = gae(rewards, old_values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = self._global_whiten(advantages, mask)
        exp = Experience(ids, attn, mask, old_logprobs, ref_logprobs, old_values, scores, rewards, kl, advantages, returns)
        n_rows = self.global_batch
        kl_seq = float(self.runtime.sum(kl.sum())) / n_rows
        lengths = mask.sum(-1)
        metrics = {
            "objective/kl": kl_seq,
            "objective/kl_coef": self.kl_ctl.value,
            "objective/non_score_reward": float(self.runtime.sum((-self.kl_ctl.value * kl).sum())) / n_rows,
            "policy/entropy": float(self.runtime.sum((entropy * mask).sum()) / self.runtime.sum(mask.sum()).clamp(min=1)),
            "val/mean": float(masked_mean(old_values, mask)),
            "val/explained_variance": float(explained_variance(old_values, returns, mask)),
            "response/length_mean": float(self.runtime.sum(lengths.sum())) / n_rows,
            "response/eos_rate": float(self.runtime.sum(rollout.ended.float().sum())) / n_rows,
            # an EOS-only response is one token long but says nothing: it counts as empty
            "response/empty_count": float(self.runtime.sum(
                ((lengths == 0) | ((lengths == 1) & rollout.ended)).float().sum())),
            "response/one_token_count": float(self.runtime.sum((lengths == 1).float().sum())),
        }
        return exp, metrics

    def _global_whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Whiten with mean/variance over the response tokens of every process (Bessel-corrected)."""
        n = self.runtime.sum(mask.sum())
        mean = self.runtime.sum((x * mask).sum()) / n.clamp(min=1)
        var = self.runtime.sum((((x - mean.float()) ** 2) * mask).sum()) / (n - 1).clamp(min=1)
        return ((x - mean.float()) * torch.rsqrt(var.float() + 1e-8)) * mask

    def update(self, exp: Experience, step: int, policy_out: PolicyOut | None = None) -> dict[str, float]:
        """PPO epochs x shuffled minibatches, each one shared optimizer step with gradient accumulation.

        policy_out: the fused first forward (with grad) over the whole batch, used by the first optimizer step.
        """
        p, world = self.cfg.ppo, self.runtime.world_size
        sums: dict[str, float] = {}
        n_tokens_total = 0.0
        stopped_early = 0.0
        for epoch in range(p.epochs):
            gen = torch.Generator().manual_seed((self.cfg.seed * 1009 + step) * 101 + epoch)
            order = torch.randperm(len(exp), generator=gen)
            epoch_kl = []
            for mb_index in order.split(p.minibatch_size):
                mb = exp.select(mb_index)
                mb_tokens = float(self.runtime.sum(mb.response_mask.sum()))
                micro = [mb.select(i) for i in torch.arange(len(mb)).chunk(p.grad_accum_steps)]

                def loss_fn(m: Experience, index: torch.Tensor = mb_index):
                    nonlocal policy_out
                    if policy_out is not None:  # fused: the forward already ran on these weights
                        logprobs, values, entropy = (x[index] if x is not None else None for x in policy_out)
                        policy_out = None
                    else:
                        logprobs, values, entropy = self.model(
                            m.input_ids, m.attention_mask, m.input_ids[:, -m.response_mask.shape[1]:],
                            need_entropy=p.ent_coef > 0, autocast_dtype=self.amp,
                        )
                    pl = policy_loss(logprobs, m.old_logprobs, m.advantages, m.response_mask, p.clip_eps,
                                     p.log_ratio_clamp, num_tokens=mb_tokens)
                    vl = value_loss(values, m.old_values, m.returns, m.response_mask, p.value_clip_eps,
                                    num_tokens=mb_tokens)
                    loss = pl.loss + p.vf_coef * vl.loss
                    if p.ent_coef > 0:
                        loss = loss - p.ent_coef * entropy_bonus(entropy, m.response_mask, num_tokens=mb_tokens)
                    ntok = float(m.response_mask.sum())
                    # DDP averages gradients over processes; the loss is already a global token mean.
                    return loss * world, {
                        "loss/policy": float(pl.loss.detach()) * mb_tokens, "loss/value": float(vl.loss.detach()) * mb_tokens,
                        "policy/clipfrac": float(pl.clipfrac) * ntok, "policy/approx_kl": float(pl.approx_kl) * ntok,
                        "policy/ratio_mean": float(pl.ratio_mean) * ntok, "val/clipfrac": float(vl.clipfrac) * ntok,
                    }

                result = self.optim.step(micro, loss_fn, where=f"step {step + 1}")
                for k, v in result.metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                sums["optim/grad_norm"] = sums.get("optim/grad_norm", 0.0) + (0.0 if result.skipped else result.grad_norm)
                n_tokens_total += float(mb.response_mask.sum())
                epoch_kl.append(result.metrics.get("policy/approx_kl", 0.0) / max(float(mb.response_mask.sum()), 1.0))
            if p.target_kl is not None:
                mean_kl = float(self.runtime.sum(sum(epoch_kl) / max(len(epoch_kl), 1))) / world
                if mean_kl > p.target_kl:
                    stopped_early = 1.0
                    break
        n_steps = max(1, p.epochs * (len(exp) // p.minibatch_size))
        out = {}
        for k, v in sums.items():
            if k.startswith("loss/"):
                out[k] = float(self.runtime.sum(v)) / world / max(float(self.runtime.sum(n_tokens_total)) / world, 1.0)
            elif k == "optim/grad_norm":
                out[k] = v / n_steps
            else:
                out[k] = float(self.runtime.sum(v)) / max(float(self.runtime.sum(n_tokens_total)), 1.0)
        out["optim/lr"] = self.optim.scheduler.get_last_lr()[0]
        out["optim/nonfinite_skipped_total"] = float(self.optim.nonfinite_total)
        out["policy/early_stopped"] = stopped_early
        return out

    # ---- loop ---------------------------------------------------------------------------------------------
    def step(self, step: int) -> StepOutput:
        """One PPO step (0-based `step`)."""
        t0 = time.perf_counter()
        rollout, examples, idx = self.rollout(step)
        t1 = time.perf_counter()
        scores, reward_metrics = self.score(rollout, examples)
        t2 = time.perf_counter()
        policy_out = None
        if self.fused_first_forward():
            policy_out = self.model(rollout.input_ids, rollout.attention_mask, rollout.response_ids,
                                    need_entropy=True, autocast_dtype=self.amp)
        exp, exp_metrics = self.experience(rollout, scores, policy_out)
        t3 = time.perf_counter()
        upd_metrics = self.update(exp, step, policy_out)
        t4 = time.perf_counter()
        self.kl_ctl.update(exp_metrics["objective/kl"], self.global_batch)
        n_tokens = float(self.runtime.sum(rollout.response_mask.sum() + rollout.prompt_mask.sum()))
        metrics = {
            **reward_metrics, **exp_metrics, **upd_metrics,
            "time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/experience_s": t3 - t2,
            "time/update_s": t4 - t3, "time/step_s": t4 - t0, "throughput/tokens_per_s": n_tokens / (t4 - t0),
        }
        samples = [
            {"prompt": rollout.prompts[i], "completion": rollout.completions[i], "score": float(scores[i])}
            for i in range(min(4, len(rollout.completions)))
        ]
        return StepOutput(metrics, samples)

    def train(self) -> dict[str, float]:
        """Run steps start_step .. max_steps; returns the last step's metrics."""
        cfg = self.cfg
        logger = MetricsLogger(cfg.output_dir, enabled=self.runtime.is_main, total=cfg.max_steps,
                               initial=self.start_step, tensorboard=cfg.log.tensorboard, progress=cfg.log.progress)
        last: dict[str, float] = {}
        trip, done = None, self.start_step
        try:
            for step in range(self.start_step, cfg.max_steps):
                out = self.step(step)
                done = step + 1
                trip = self.watch.after_step(done, cfg.max_steps, lambda: self.actor.policy, out.metrics)
                last = out.metrics
                if done % cfg.log.every == 0 or done == cfg.max_steps or trip is not None:
                    logger.log(done, out.metrics, ("reward/mean", "objective/kl", "time/step_s"))
                if cfg.log.samples_every and done % cfg.log.samples_every == 0:
                    logger.samples(done, out.samples)
                if trip is not None:
                    break
                if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.max_steps:
                    self.state.save(done)
            self.state.save(done)
            self.state.export_final()
            if trip is not None:
                self.watch.rollback(trip)
        finally:
            logger.close()
        return last


def train_ppo(config: PPORunConfig, reward_fn: RewardFn | list[RewardFn] | None = None,
              task: Task | None = None, eval_examples: list[Example] | None = None) -> dict[str, float]:
    """Python API: run PPO with `config`; optional extra reward function(s) (prompts, completions, **fields),
    an optional Task object used instead of config.task.name, and optional held-out examples for
    `eval.every` (default: task.eval_data, or eval_fraction of the task's data split off)."""
    return PPOTrainer(config, reward_fn=reward_fn, task=task, eval_examples=eval_examples).train()

