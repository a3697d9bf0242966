"""Typed configuration: YAML file + dotted ``key=value`` overrides, validated before any model loads.

Every field has one doc string (its attribute docstring, read by pydantic). Unknown keys and wrong types
are errors that name the key and what is allowed. The resolved config is saved into ``output_dir``.
Validation is done by pydantic, never by ``assert``, so it holds under ``python -O``. Reading YAML, applying
overrides and formatting errors: ``ppolm.config_io``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# the public config API lives here; reading and writing is in config_io
from ppolm.config_io import describe, format_validation_error, load_config, save_config  # noqa: F401
from ppolm.errors import ConfigError  # noqa: F401


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, field docs come from attribute docstrings."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class RolloutConfig(Section):
    batch_size: int = Field(8, ge=1)
    """Prompts sampled per step on each process (global batch = batch_size x processes)."""
    max_new_tokens: int = Field(24, ge=1, le=4096)
    """Longest response in tokens; longer responses are cut and count as not ended."""
    min_new_tokens: int = Field(0, ge=0)
    """EOS is suppressed before this many tokens (0 = off)."""
    max_prompt_tokens: int = Field(256, ge=1)
    """Prompts longer than this (after the chat template) are dropped at load, with a count."""
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    """Sampling temperature; 0 means greedy."""
    top_k: int = Field(0, ge=0)
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (1.0 = off)."""
    stop: list[str] = Field(default_factory=list, max_length=16)
    """Stop strings: a response ends after the first one it contains (EOS always stops)."""
    use_chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template when it has one."""
    samples_per_prompt: int = Field(1, ge=1, le=256)
    """k responses drawn per prompt in one batched generate (a group, rows kept together); a step has
    batch_size x k rows. Group estimators (algo.estimator grpo, rloo, dr_grpo) need k >= 2 to have a baseline."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Prompts per generate call (their k samples each); a smaller value bounds the rollout's memory (KV cache,
    logits) at some speed. null = all of batch_size in one call. OOM recovery (ppo.oom_recovery) halves it."""


class KLConfig(Section):
    # "in" is a Python keyword: the field is `in_`, read and written as `kl.in` (alias).
    model_config = ConfigDict(serialize_by_alias=True)

    coef: float = Field(0.05, ge=0.0)
    """Initial coefficient of the per-token KL penalty against the reference model."""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator of the penalty (reward or loss): k1 = log(pi/ref), k3 = (r-1) - log r."""
    in_: Literal["reward", "loss"] = Field("reward", alias="in")
    """Where the KL penalty goes: 'reward' (per-token reward shaping, InstructGPT) or 'loss' (kl_coef x KL
    added to the policy loss, as GRPO does)."""
    adaptive: bool = False
    """Adapt kl_coef towards `target` (Ziegler et al. 2019); otherwise it stays fixed."""
    target: float = Field(6.0, gt=0.0)
    """Target KL per sequence (nats) for the adaptive controller."""
    horizon: float = Field(10000.0, gt=0.0)
    """Horizon (in samples) of the adaptive controller."""


class PPOConfig(Section):
    epochs: int = Field(1, ge=1, le=100)
    """Passes over each rollout batch."""
    minibatch_size: int = Field(8, ge=1)
    """Rows per optimizer step (per process); must divide rollout.batch_size."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches per minibatch whose gradients are summed before one optimizer step."""
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0)
    """Policy ratio clip range epsilon of algo.policy_loss 'ppo' (both sides, unless algo.clip_eps_low/high)."""
    value_clip_eps: float | None = Field(0.2, gt=0.0)
    """Value clip range around the old values (null disables value clipping)."""
    vf_coef: float = Field(0.1, ge=0.0)
    """Weight of the value loss in the total loss (only with a critic, algo.estimator: gae)."""
    ent_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus (0 = off)."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """Discount factor of GAE and of REINFORCE++'s token returns."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalize GAE advantages over the batch's response tokens (reinforce_pp always does; grpo, rloo and
    dr_grpo never do: their group baseline is the normalisation)."""
    log_ratio_clamp: float = Field(20.0, gt=0.0)
    """Clamp |log pi/pi_old| before exp() so a single token cannot overflow the loss."""
    target_kl: float | None = Field(None, gt=0.0)
    """Stop the epochs of a step early once approx-KL old||new exceeds this (null = never)."""
    fuse_first_forward: bool = True
    """With one epoch of one minibatch (no accumulation), take old log-probs and values from the update's own
    forward (same weights, so the same numbers) instead of a separate forward: one policy forward fewer."""
    max_tokens: int | None = Field(None, ge=1)
    """Packed, token-budget micro-batches for the scoring pass (old log-probs, values, reference) and the update:
    each micro-batch's rows are packed into one sequence of their real tokens only (no padding; attention kept
    within each row) holding at most this many tokens (a longer row goes alone), instead of
    minibatch_size / grad_accum_steps padded rows. Same results within float rounding. null = padded rows."""
    oom_recovery: bool = True
    """On an out-of-memory error in a rollout, scoring or update micro-batch, halve that micro-batch for the rest
    of the run and retry (logged as oom/*); one process without DeepSpeed only (elsewhere the error is raised)."""


class EvalConfig(Section):
    every: int = Field(0, ge=0)
    """Run the task's metric on held-out examples every N steps and at the end (0 = off)."""
    limit: int = Field(64, ge=1)
    """Held-out examples per evaluation (an even spread over the held-out split)."""
    batch_size: int = Field(16, ge=1)
    """Prompts per generation batch during these evaluations."""
    metric: str | None = None
    """Metric that picks the best checkpoint and that the guard watches (null = the task's headline metric:
    accuracy, f1, chrf or reward_mean)."""
    keep_best: bool = True
    """Write output_dir/best (a plain HF model directory) whenever the metric reaches a new best."""
    at_start: bool = True
    """Also measure the starting model before the first step (step 0 of the curve). With keep_best it is the
    first best/, so a guard that fires at the first check rolls back to the start, not to a bad step."""


class GuardConfig(Section):
    max_drop: float | None = Field(None, ge=0.0)
    """Stop when the held-out metric falls more than this below its best so far, and by more than `z` standard
    errors of the difference (null = off)."""
    z: float = Field(2.0, ge=0.0)
    """How many standard errors of the difference (sqrt(se_best^2 + se_now^2)) a drop must also exceed before
    max_drop stops the run: a dip within the noise of the check is not acted on (0 = the plain comparison)."""
    collapse_share: float | None = Field(None, gt=0.0, le=1.0)
    """Stop when one predicted label takes more than this share of the held-out predictions while no gold
    label does (classification; null = off)."""
    max_kl: float | None = Field(None, gt=0.0)
    """Stop when the sampled KL to the reference (objective/kl, nats per sequence) passes this (PPO; null = off)."""
    rollback: bool = True
    """On a stop, final/ becomes the best checkpoint's model (needs eval.keep_best); otherwise the last one."""


class AlgoConfig(Section):
    estimator: Literal["gae", "grpo", "rloo", "reinforce_pp", "dr_grpo"] = "gae"
    """Advantage estimator: 'gae' (PPO with a critic) or critic-free 'grpo', 'rloo', 'reinforce_pp',
    'dr_grpo' (no value model built or trained; see docs/implementation-details.md). grpo, rloo and dr_grpo
    need rollout.samples_per_prompt >= 2."""
    policy_loss: Literal["ppo", "gspo", "cispo"] = "ppo"
    """Policy loss: 'ppo' (clipped surrogate, per-token ratio), 'gspo' (Zheng et al. 2025: one ratio per
    response, the geometric mean of its token ratios, clipped per response; loss.agg seq_mean_token_mean), 'cispo'
    (MiniMax-M1 2025: clipped importance weights under a stop-gradient, every token keeps its gradient; loss.agg
    null resolves to token_mean). See ppolm/algo/policy_losses.py."""
    clip_eps_low: float | None = Field(None, gt=0.0, le=1.0)
    """The ratio (or IS weight) is kept above 1 - clip_eps_low. null = the policy loss's paper default: ppo.clip_eps
    for ppo, 3e-4 for gspo, none for cispo (1.0: the weight only stays >= 0)."""
    clip_eps_high: float | None = Field(None, gt=0.0)
    """The ratio (or IS weight) is kept below 1 + clip_eps_high. null = the policy loss's paper default:
    ppo.clip_eps for ppo, 4e-4 for gspo, 3.0 for cispo (a weight cap of 4). DAPO's clip-higher: 0.28 with ppo."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose k responses got the same raw score and sample more prompts
    until the batch is full (or dynamic_sampling_max_rounds); needs a group estimator (grpo, rloo, dr_grpo)."""
    dynamic_sampling_max_rounds: int = Field(4, ge=2, le=100)
    """Most generation rounds per step with dynamic_sampling (the first included); when they do not find enough
    varied groups, the batch is filled with dropped ones (logged as dynamic_sampling/filled_groups)."""
    overlong_buffer: int = Field(0, ge=0)
    """DAPO's overlong reward shaping: a response longer than rollout.max_new_tokens - overlong_buffer tokens pays a
    penalty rising linearly to overlong_penalty at max_new_tokens (0 = off; DAPO: 4096 of 20480)."""
    overlong_penalty: float = Field(1.0, gt=0.0)
    """Largest overlong penalty, subtracted from the score of a response of rollout.max_new_tokens tokens
    (DAPO: 1.0)."""


# The estimators whose baseline is the rest of the group (ppolm.algo.estimators: Estimator.group_baseline; the
# config does not import the maths, so the names are repeated here and a test keeps the two lists equal).
GROUP_ESTIMATORS = ("grpo", "rloo", "dr_grpo")


class LossConfig(Section):
    agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] | None = None
    """How the policy loss (with its KL and entropy terms) is averaged over a minibatch: 'token_mean' (every
    response token weighs the same), 'seq_mean_token_mean' (mean over each response's tokens, then over
    responses: the GRPO paper), 'seq_mean_token_sum_norm' (sum over each response's tokens / max_new_tokens,
    mean over responses: Dr. GRPO). null = the estimator's paper default: token_mean for gae and reinforce_pp,
    seq_mean_token_mean for grpo, seq_mean_token_sum_norm for dr_grpo and rloo (whole-response REINFORCE). The
    value loss is always a token mean."""


class RewardFunctionConfig(Section):
    name: str
    """Registered reward function name, or 'module:function' importable from the Python path."""
    weight: float = 1.0
    """Weight of this function in the weighted sum of rewards."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed to the function."""


class RewardConfig(Section):
    functions: list[RewardFunctionConfig] = Field(default_factory=list)
    """Plain reward functions (prompts, completions, **row_fields) -> list[float]."""
    model: str | None = None
    """A sequence-classification reward model (directory or name); its score is added with `model_weight`."""
    model_weight: float = 1.0
    """Weight of the reward model's score."""
    normalize: bool = False
    """Scale scores by a running std (and subtract a running mean)."""
    clip: float | None = Field(None, gt=0.0)
    """Clip scores to [-clip, clip] after normalization (null = off)."""
    missing_eos_penalty: float | None = None
    """Added to the score of a response that hit max_new_tokens without EOS/stop (e.g. -1.0)."""

    @model_validator(mode="after")
    def _check_functions(self) -> "RewardConfig":
        # Resolve names and settings now (a typo in a function's kwargs, an unknown judge model), so a pipeline
        # fails when its config is read, not after the stages before PPO have run.
        from ppolm.errors import ModelLoadError
        from ppolm.rewards.compose import resolve_reward_function

        for f in self.functions:
            try:
                resolve_reward_function(f.name, f.kwargs)
            except (ConfigError, ModelLoadError) as exc:
                raise ValueError(str(exc)) from None
        return self


class OptimConfig(Section):
    lr: float = Field(1e-5, gt=0.0, le=1.0)
    """Peak learning rate of the policy."""
    critic_lr: float | None = Field(None, gt=0.0, le=1.0)
    """Learning rate of the critic (null = same as lr)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.95)
    """AdamW betas, each in [0, 1)."""
    eps: float = Field(1e-8, gt=0.0)
    """AdamW epsilon."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate decay after warmup, over the run's optimizer steps."""
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Clip the global gradient norm (null = off)."""
    max_nonfinite_steps: int = Field(3, ge=1)
    """Abort after this many optimizer steps in a row whose gradients were not finite."""


class CriticConfig(Section):
    kind: Literal["head", "separate"] = "head"
    """'head': a value head on the policy's backbone (one forward for both); 'separate': its own model."""
    init: Literal["policy", "reward"] = "policy"
    """Initialize a separate critic from the policy weights or from the reward model (its backbone and its score
    head, which becomes the value head: the first values are the reward model's scores of each prefix)."""
    head_init: Literal["zero", "normal"] = "zero"
    """Value head weights: 'zero' (V = 0 at the start: the first advantages are the whitened returns) or
    'normal' (std 1/sqrt(H+1), the N+ RLHF details' choice)."""


class LoraConfig(Section):
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights; the reference is the base with adapters off."""
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: float = Field(32.0, gt=0.0)
    """LoRA scaling alpha."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """LoRA dropout."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or 'all-linear'."""


class LogConfig(Section):
    every: int = Field(1, ge=1)
    """Write a metrics line every N steps."""
    samples_every: int = Field(10, ge=0)
    """Log sample completions every N steps (0 = never)."""
    tensorboard: bool = True
    """Also write TensorBoard events when tensorboard is installed."""
    progress: bool = True
    """Show a progress bar."""


class CheckpointConfig(Section):
    every: int = Field(50, ge=0)
    """Save a checkpoint every N steps (0 = only at the end); SIGTERM/SIGINT also save one before exiting."""
    keep: int | None = Field(2, ge=1)
    """Keep at most this many checkpoints (null = all)."""
    sharded: bool = False
    """Under an FSDP2 launch, each process writes its own shards of the weights and optimizer state
    (torch.distributed.checkpoint) instead of the main process gathering full copies: no process ever holds the
    whole state. Needs a directory every process sees; resume at the same process count. Ignored elsewhere
    (one process or DDP hold whole models anyway; DeepSpeed ZeRO checkpoints are always the engine's shards)."""


class TaskConfig(Section):
    name: str = "generation"
    """Built-in task (classification, ner, translation, generation, toy) or 'module:attr'."""
    data: str | list[str] | None = None
    """Training data file, or a list of files read in order; null uses the task's shipped demo data."""
    eval_data: str | list[str] | None = None
    """Held-out data file(s); null splits off `eval_fraction` of the training data."""
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    """Fraction of rows held out for evaluation when eval_data is null."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many training rows."""
    eval_limit: int | None = Field(None, ge=1)
    """Evaluate on at most this many rows."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Task-specific options (validated by the task before any model loads)."""


class CommonConfig(Section):
    model: str = "smollm2-135m-instruct"
    """Model to start from: the embedded default, a tiny-random-* name, a local directory or a hub id."""
    output_dir: str = "runs/latest"
    """Where metrics, checkpoints, the resolved config and the final model are written."""
    seed: int = 0
    """Seed for every random choice of the run (sampling, shuffling, initialization)."""
    max_steps: int = Field(20, ge=1)
    """Training steps (PPO: rollout + update cycles; SFT/RM: optimizer steps)."""
    resume: bool = False
    """Continue from the latest valid checkpoint in output_dir."""
    overwrite_output_dir: bool = False
    """Replace a previous run in output_dir (its checkpoints, metrics, final model); without it (or resume) a
    used output_dir is refused."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'bf16' autocast for the models (maths stays fp32); 'auto' picks bf16 where the hardware has it."""
    trust_remote_code: bool = False
    """Allow model code from the model directory to run (off unless asked for)."""
    gradient_checkpointing: Literal[False, True, "selective", "auto"] = "auto"
    """Activation checkpointing of the trained transformer. 'auto' (default): PPO takes false when the memory plan
    (`ppolm plan`) fits the memory available to the process (or the device's), else the cheapest mode that fits
    (and micro-batches, ppo.grad_accum_steps, when none fits the whole minibatch and neither that key nor
    ppo.max_tokens is set); SFT, RM
    and DPO take 'selective'; the choice is printed at start and saved in config.yaml (a resume keeps it).
    'selective': each layer keeps its matmul and
    attention outputs and recomputes the cheap ops (norms, activations, rotary, casts) in the backward, the same
    values bit for bit with ~40% fewer saved activations (off under DeepSpeed ZeRO-3); true: recompute each
    layer's whole forward (least memory, one more forward of time); false: keep every activation."""
    allow_changed_resume: bool = False
    """Resume even if the config or data changed since the checkpoint (warns instead of refusing)."""


class PPORunConfig(CommonConfig):
    """Configuration of `ppolm ppo`."""

    task: TaskConfig = Field(default_factory=TaskConfig)
    """The task: data, prompts, rewards and metrics."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Sampling of responses."""
    reward: RewardConfig = Field(default_factory=RewardConfig)
    """Reward functions and reward model (empty = the task's default reward)."""
    kl: KLConfig = Field(default_factory=KLConfig)
    """KL penalty against the reference model."""
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    """The RL algorithm: advantage estimator, policy loss, DAPO's dynamic sampling and overlong shaping."""
    loss: LossConfig = Field(default_factory=LossConfig)
    """How the policy loss is aggregated over tokens and responses."""
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    """PPO update hyper-parameters."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    critic: CriticConfig = Field(default_factory=CriticConfig)
    """The value model."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """LoRA adapters."""
    log: LogConfig = Field(default_factory=LogConfig)
    """Logging."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Held-out evaluation during training and best-checkpoint keeping."""
    guard: GuardConfig = Field(default_factory=GuardConfig)
    """Guardrails: stop and roll back when the held-out metric drops, predictions collapse or KL runs away."""

    @model_validator(mode="after")
    def _check_batches(self) -> "PPORunConfig":
        k = self.rollout.samples_per_prompt
        rows = self.rollout.batch_size * k
        if rows % self.ppo.minibatch_size:
            of = f"rollout.batch_size x rollout.samples_per_prompt ({rows})" if k > 1 else ""
            of = of or f"rollout.batch_size ({rows})"
            raise ValueError(f"ppo.minibatch_size ({self.ppo.minibatch_size}) must divide {of}")
        if self.ppo.minibatch_size % k:
            raise ValueError(f"ppo.minibatch_size ({self.ppo.minibatch_size}) must be a multiple of "
                             f"rollout.samples_per_prompt ({k}): a minibatch holds whole groups")
        if self.ppo.minibatch_size % self.ppo.grad_accum_steps:
            raise ValueError(
                f"ppo.grad_accum_steps ({self.ppo.grad_accum_steps}) must divide ppo.minibatch_size "
                f"({self.ppo.minibatch_size})"
            )
        if self.ppo.max_tokens is not None and self.ppo.grad_accum_steps != 1:
            raise ValueError("ppo.max_tokens sizes the micro-batches by tokens; ppo.grad_accum_steps splits by rows: "
                             "set one of them (leave ppo.grad_accum_steps at 1)")
        if self.critic.init == "reward" and not self.reward.model:
            raise ValueError("critic.init: 'reward' needs reward.model to be set (or use critic.init: 'policy')")
        check_guard(self.eval, self.guard)
        if self.critic.kind == "separate" and self.algo.estimator != "gae":
            raise ValueError(f"critic.kind: 'separate' needs a critic; algo.estimator '{self.algo.estimator}' "
                             "trains none (use algo.estimator: gae)")
        if self.critic.init == "reward" and self.critic.kind != "separate":
            raise ValueError("critic.init: 'reward' needs critic.kind: 'separate' (a value head shares the policy)")
        check_estimator_settings(self)
        return check_ppo_sampling(self)


def check_estimator_settings(cfg: "PPORunConfig") -> None:
    """Settings that run but do nothing, or something else than their name says."""
    est, k = cfg.algo.estimator, cfg.rollout.samples_per_prompt
    if est in GROUP_ESTIMATORS and k < 2:
        raise ValueError(f"algo.estimator '{est}' needs rollout.samples_per_prompt >= 2 (got {k}): its baseline is "
                         "the other responses to the same prompt, and without them it is REINFORCE on the raw "
                         "reward; set rollout.samples_per_prompt (e.g. 4) or use algo.estimator 'reinforce_pp' or "
                         "'gae'")
    check_policy_loss_settings(cfg)
    kl = cfg.kl
    if kl.in_ == "loss" and kl.estimator == "k1" and (kl.coef > 0 or kl.adaptive):
        raise ValueError("kl.in: 'loss' with kl.estimator: 'k1' penalises nothing: the gradient of a k1 term, "
                         "log pi - log ref, is zero in expectation over samples of pi; set kl.estimator: k3 "
                         "(GRPO) or k2, or kl.in: reward")


def check_policy_loss_settings(cfg: "PPORunConfig") -> None:
    """algo.policy_loss and DAPO's switches: combinations that do not mean what their names say."""
    a = cfg.algo
    if a.policy_loss == "gspo" and cfg.loss.agg not in (None, "seq_mean_token_mean"):
        raise ValueError(f"algo.policy_loss 'gspo' with loss.agg '{cfg.loss.agg}': GSPO's objective is a mean over "
                         "responses of one clipped sequence ratio each (Zheng et al. 2025 eq. 5), another "
                         "aggregation weighs responses by length; use loss.agg: seq_mean_token_mean or null")
    if a.policy_loss != "ppo" and cfg.ppo.clip_eps != PPOConfig.model_fields["clip_eps"].default:
        raise ValueError(f"ppo.clip_eps is the clip range of algo.policy_loss 'ppo'; '{a.policy_loss}' clips with "
                         "algo.clip_eps_low / algo.clip_eps_high (null: the paper's values)")
    if a.dynamic_sampling and a.estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"algo.dynamic_sampling drops groups whose rewards are all equal, which only have a zero "
                         f"advantage with a group estimator; algo.estimator '{a.estimator}' is not one (use grpo, "
                         "rloo or dr_grpo with rollout.samples_per_prompt >= 2)")
    defaults = AlgoConfig.model_fields
    if not a.dynamic_sampling and a.dynamic_sampling_max_rounds != defaults["dynamic_sampling_max_rounds"].default:
        raise ValueError("algo.dynamic_sampling_max_rounds bounds algo.dynamic_sampling, which is off")
    if not a.overlong_buffer and a.overlong_penalty != defaults["overlong_penalty"].default:
        raise ValueError("algo.overlong_penalty scales the overlong shaping, which is off: set algo.overlong_buffer "
                         "(the soft window in tokens, DAPO: 4096 of 20480)")
    if a.overlong_buffer > cfg.rollout.max_new_tokens:
        raise ValueError(f"algo.overlong_buffer ({a.overlong_buffer}) must be at most rollout.max_new_tokens "
                         f"({cfg.rollout.max_new_tokens}): it is the last part of that length budget")


def check_ppo_sampling(cfg: "PPORunConfig") -> "PPORunConfig":
    """PPO's ratio needs the log-probs of the policy that sampled: scoring uses logits / temperature, which is
    that policy only without truncation (top-k/top-p) and with temperature > 0; LoRA dropout would make the
    rollout (eval) and update (train) functions differ."""
    r = cfg.rollout
    if r.temperature == 0:
        raise ValueError("rollout.temperature: 0 (greedy) is not a sampling policy PPO can score; use > 0")
    if r.top_k or r.top_p < 1.0:
        raise ValueError("rollout.top_k / rollout.top_p: truncated sampling is not scored by PPO (the ratio would "
                         "be biased); keep top_k=0 and top_p=1.0")
    if cfg.lora.enabled and cfg.lora.dropout > 0:
        raise ValueError("lora.dropout: must be 0 for PPO (rollout runs without dropout, the update with it)")
    return cfg


def check_guard(eval_cfg: EvalConfig, guard: GuardConfig) -> None:
    """Guards on the held-out metric need the evaluation that measures it."""
    if (guard.max_drop is not None or guard.collapse_share is not None) and not eval_cfg.every:
        raise ValueError("guard.max_drop / guard.collapse_share watch the held-out evaluation: set eval.every > 0")
    if guard.rollback and guard != GuardConfig() and not eval_cfg.keep_best:
        raise ValueError("guard.rollback restores the best checkpoint: set eval.keep_best: true "
                         "(or guard.rollback: false)")
