"""From completions to one scalar score per sequence: weighted reward functions and/or a reward model,
then running normalization, clipping and the missing-EOS penalty.

A reward function is a plain function ``fn(prompts, completions, **row_fields) -> list[float]``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ppolm.errors import ConfigError
from ppolm.rewards.task_rewards import REWARD_FUNCTIONS, get_reward_function

RewardFn = Callable[..., list[float]]
INDEPENDENT_JUDGE = "ppolm.eval.judge"
"""A policy trained against the judge would leave no independent measure of reward hacking: refused by name."""


def resolve_reward_function(name: str, kwargs: dict[str, Any] | None = None) -> RewardFn:
    """A registered name (see REWARD_FUNCTIONS) or 'module:function'; kwargs are bound once."""
    kwargs = kwargs or {}
    if ":" in name:
        module, _, attr = name.partition(":")
        if module == INDEPENDENT_JUDGE:
            raise ConfigError(f"reward function '{name}': {INDEPENDENT_JUDGE} is the independent judge of the RLHF "
                              "flow; it only measures, it is never a reward (docs/metrics.md)")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"reward function '{name}': cannot import ({exc})") from None
        if not callable(fn):
            raise ConfigError(f"reward function '{name}': not callable")
        return (lambda prompts, completions, **rows: fn(prompts, completions, **kwargs, **rows)) if kwargs else fn
    if name not in REWARD_FUNCTIONS:
        raise ConfigError(f"reward function '{name}': unknown (allowed: {', '.join(sorted(REWARD_FUNCTIONS))}, "
                          "or 'module:function')")
    return get_reward_function(name, **kwargs)


@torch.no_grad()
def reward_model_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    autocast_dtype: torch.dtype | None = None,
    max_length: int = 1024,
) -> torch.Tensor:
    """Score each text with a sequence-classification model at its last real token. -> (B,) fp32.

    The pooled position is found from the attention mask rather than from pad ids, which breaks when the
    pad token equals EOS (as in SmolLM2).
    """
    device = next(model.parameters()).device
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    add_special_tokens=False, padding_side="right")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(device.type, enabled=False)
    with ctx:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    last = (mask.sum(-1) - 1).clamp(min=0)
    head = getattr(model, "score", None)
    if head is not None:
        hidden = out.hidden_states[-1][torch.arange(ids.shape[0], device=device), last]
        bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        with torch.autocast(device.type, enabled=False):
            return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)[:, 0]
    return out.logits.float()[:, 0]


@dataclass
class RunningMoments:
    """Running mean and variance over all scores seen (Chan et al. parallel update); checkpointed."""

    count: float = 0.0
    mean: float = 0.0
    var: float = 1.0

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_var = float(x.var(unbiased=False)) if n > 1 else 0.0
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.var = float(state["count"]), float(state["mean"]), float(state["var"])


@dataclass
class ScoreStats:
    """What happened to one batch's scores (logged as reward/*)."""

    raw: torch.Tensor
    nonfinite: int = 0
    eos_penalized: int = 0


@dataclass
class Scorer:
    """Turns (prompts, completions, rows) into per-sequence scores (B,) fp32."""

    functions: list[tuple[RewardFn, float]] = field(default_factory=list)
    reward_model: PreTrainedModel | None = None
    reward_tokenizer: PreTrainedTokenizerBase | None = None
    model_weight: float = 1.0
    normalize: bool = False
    clip: float | None = None
    missing_eos_penalty: float | None = None
    autocast_dtype: torch.dtype | None = None
    moments: RunningMoments = field(default_factory=RunningMoments)

    def raw_scores(self, prompts: list[str], completions: list[str], rows: dict[str, list]) -> torch.Tensor:
        """Weighted sum of every reward source, before normalization. -> (B,) fp32 (may hold NaN/inf)."""
        total = torch.zeros(len(completions), dtype=torch.float32)
        for fn, weight in self.functions:
            values = fn(prompts, completions, **rows)
            if len(values) != len(completions):
                raise ValueError(f"reward function returned {len(values)} scores for {len(completions)} completions")
            total += weight * torch.tensor([float(v) for v in values], dtype=torch.float32)
        if self.reward_model is not None:
            texts = [p + c for p, c in zip(prompts, completions)]
            total += self.model_weight * reward_model_scores(
                self.reward_model, self.reward_tokenizer, texts, self.autocast_dtype
            ).cpu()
        return total

    def finish(
        self, raw: torch.Tensor, ended: torch.Tensor, all_raw: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ScoreStats]:
        """Normalization, clipping and EOS penalty applied to raw scores (B,).

        Non-finite raw scores become 0 and are counted, never propagated: they stay 0 after normalization and
        clipping (a zeroed score is "no signal", not the penalty (0 - mean) / std). The EOS penalty still applies.
        all_raw: raw scores of the global batch (multi-process) for the running moments; default = this batch.
        """
        finite = torch.isfinite(raw)
        scores = torch.where(finite, raw, torch.zeros_like(raw))
        stats = ScoreStats(raw=raw, nonfinite=int((~finite).sum()))
        if self.normalize:
            pool = all_raw if all_raw is not None else raw
            self.moments.update(pool[torch.isfinite(pool)])
            scores = torch.where(finite, (scores - self.moments.mean) / self.moments.std, torch.zeros_like(scores))
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        if self.missing_eos_penalty is not None:
            not_ended = ~ended.cpu()
            scores = scores + self.missing_eos_penalty * not_ended.float()
            stats.eos_penalized = int(not_ended.sum())
        return scores, stats
