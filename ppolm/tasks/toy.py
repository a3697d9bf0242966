"""A toy task a tiny random model can learn in seconds: write as many target characters as possible.

Used by configs/tiny.yaml and the tests: the reward is the fraction of characters of the completion that are
in `chars`, so a policy that learns to emit them sees its reward rise from ~len(chars)/vocab towards 1.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ppolm.tasks.base import Decoding, Example, Task, TaskOptions


class ToyOptions(TaskOptions):
    chars: str = "a"
    """Characters that earn reward."""
    n_prompts: int = 64
    """How many synthetic prompts to generate."""
    prompt_words: int = 3
    """Words per synthetic prompt (benchmarks use longer prompts)."""


def char_fraction_reward(prompts: Sequence[str], completions: Sequence[str], *, chars: str = "a", **_: Any) -> list[float]:
    """Fraction of the completion's characters that belong to `chars` (0 for an empty completion)."""
    return [sum(c in chars for c in text) / len(text) if text else 0.0 for text in completions]


class ToyTask(Task):
    name = "toy"
    Options = ToyOptions
    decoding = Decoding(max_new_tokens=16, temperature=1.0)

    def load(self, path: str | None) -> list[Example]:
        rng = random.Random(1234)
        words = ["sun", "tree", "river", "stone", "cloud", "bird", "road", "lamp"]
        return [
            Example(prompt=" ".join(rng.choice(words) for _ in range(self.options.prompt_words)), source="toy", line=i + 1)
            for i in range(self.options.n_prompts)
        ]

    def reward_functions(self):
        chars = self.options.chars
        return [(lambda p, c, **f: char_fraction_reward(p, c, chars=chars), 1.0)]

    def metrics(self, examples, completions, **extra):
        rewards = char_fraction_reward([e.prompt for e in examples], completions, chars=self.options.chars)
        return {"reward_mean": sum(rewards) / max(len(rewards), 1), "n": len(rewards)}
