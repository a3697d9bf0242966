"""The task contract: dataset reader -> prompt -> decoding settings -> reward function(s) -> metrics.

SFT, PPO, evaluation, generation and serving all use a task the same way. A user adds a task with a
subclass of `Task` in one small Python file (named as 'module:attr' in the config) or in YAML that names a
reward function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

RewardFn = Callable[..., list[float]]


@dataclass(frozen=True)
class Example:
    """One row of a task. prompt: the user message (before the chat template); reference: the expected
    completion (SFT target, evaluation reference); fields: per-row values passed to reward functions."""

    prompt: str
    reference: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    line: int = 0


@dataclass(frozen=True)
class Decoding:
    """Decoding settings a task recommends for evaluation and serving (saved with an exported model)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Every path that builds decoding settings (tasks, `ppolm eval/generate` flags, the pipeline) lands here:
        # NaN passes `< 0` checks, so ranges are checked as "inside", not "not outside".
        from ppolm.errors import ConfigError

        if not (0.0 <= self.temperature <= 10.0):
            raise ConfigError(f"temperature must be a number in [0, 10], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ConfigError(f"top_k must be >= 0 and max_new_tokens >= 1 (got {self.top_k}, {self.max_new_tokens})")


DECODING_FILE = "ppolm_decoding.json"
"""Next to an exported model's weights: the decoding settings `ppolm serve` falls back to, and who made it."""


def decoding_record(decoding: Decoding, system_prompt: str | None, **metadata: Any) -> dict[str, Any]:
    """What DECODING_FILE holds, the same for SFT and PPO final/ and the pipeline's export: a task's decoding
    settings (the ones its held-out checks use; the one source of max_new_tokens and stop) and system prompt,
    plus `metadata` for people (task, stage, base_model), which serving ignores."""
    return {"temperature": decoding.temperature, "top_p": decoding.top_p, "top_k": decoding.top_k,
            "max_new_tokens": decoding.max_new_tokens, "stop": list(decoding.stop), "system_prompt": system_prompt,
            **metadata}


class TaskOptions(BaseModel):
    """Base of a task's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Task:
    """Subclass and fill in: `load`, `reward_functions`, `metrics`. Options are validated at construction."""

    name: ClassVar[str] = "task"
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    system_prompt: str | None = None
    decoding: Decoding = Decoding()
    primary_metric: ClassVar[str] = "reward_mean"
    """The metric that says how good a model is at this task (best checkpoint, guardrails, reports)."""

    def __init__(self, **options: Any):
        self.options = self.Options.model_validate(options)

    def load(self, path: str | None) -> list[Example]:
        """Read `path` (None = the task's shipped demo data) into examples."""
        raise NotImplementedError

    def load_all(self, data: str | Sequence[str] | None) -> list[Example]:
        """`load` for one path, or the examples of several files in order (e.g. two domains of one task)."""
        if data is None or isinstance(data, str):
            return self.load(data)
        return [ex for path in data for ex in self.load(path)]

    def reward_functions(self) -> list[tuple[RewardFn, float]]:
        """Default reward: weighted plain functions (prompts, completions, **fields) -> list[float]."""
        raise NotImplementedError

    def metrics(self, examples: Sequence[Example], completions: Sequence[str], **extra: Any) -> dict[str, Any]:
        """Field-standard metrics of `completions` against `examples`."""
        raise NotImplementedError

    def row_fields(self, examples: Sequence[Example]) -> dict[str, list]:
        """Column-wise fields of a batch, as reward functions receive them."""
        keys = sorted({k for ex in examples for k in ex.fields})
        return {k: [ex.fields.get(k) for ex in examples] for k in keys}
