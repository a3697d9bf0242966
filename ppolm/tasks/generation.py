"""Open-ended generation with a scalar reward: the sentiment-controlled review continuation of Ziegler et al.
2019 (and TRL's ``gpt2-sentiment``) by default.

Prompts come from text: a ``prompt`` field is used whole; a ``text`` field (an IMDB review) is cut to its
first ``prompt_words`` words, and the next ``reference_words`` words become the reference continuation (the
SFT target). ``.txt`` files hold one text per line. The user message is ``instruction`` with the opening in
place of ``{text}``.

Reward: the offline lexicon scorer of ``ppolm.rewards.sentiment`` towards ``target_sentiment`` (a word
count, documented as weak), or a sequence-classification reward model directory (``reward_model``).
Metrics: mean reward, KL to the reference model, perplexity under it, distinct-1/2 and mean length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from ppolm.data.readers import check_fields, missing_reason, read_records
from ppolm.errors import DataError
from ppolm.eval.metrics import generation_metrics
from ppolm.rewards.sentiment import sentiment_reward, sentiment_score
from ppolm.tasks.base import Decoding, Example, RewardFn, Task, TaskOptions
from ppolm.tasks.classification import clean_input
from ppolm.tasks.demo_data import demo_path

DEFAULT_INSTRUCTION = "Continue this movie review:\n\n{text}"
REFERENCE_FIELDS = ("reference", "completion", "response", "continuation")


class GenerationOptions(TaskOptions):
    text_field: str | None = None
    """Field holding the prompt text; default 'prompt' (used whole), else 'text' (cut to prompt_words)."""
    prompt_words: int | None = Field(8, ge=1)
    """Words of a 'text' field that form the opening (null: the whole text)."""
    reference_words: int = Field(48, ge=0)
    """Words after the opening kept as the reference continuation (0: no reference)."""
    min_chars: int = Field(0, ge=0)
    """Skip texts shorter than this (TRL's IMDB recipe keeps reviews over 200 characters)."""
    instruction: str = DEFAULT_INSTRUCTION
    """User message template with {text} (use '{text}' alone to send the opening as it is)."""
    target_sentiment: Literal["positive", "negative"] = "positive"
    """Which way the lexicon reward pulls."""
    reward_model: str | None = None
    """A sequence-classification reward model (directory or name) scoring prompt + completion instead."""
    reference_model: str | None = None
    """Model for KL and perplexity at evaluation and in held-out checks during training (default: the evaluated
    model itself, so KL = 0)."""


class GenerationTask(Task):
    name = "generation"
    Options = GenerationOptions
    decoding = Decoding(max_new_tokens=48, temperature=0.0)
    # evaluate() computes per-sequence KL to the reference model and its NLL of the completion for this task.
    needs_reference_scores: ClassVar[bool] = True

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._rm = None  # (model, tokenizer), loaded at the first reward-model call

    def load(self, path: str | None) -> list[Example]:
        """Examples with prompt = instruction(opening), reference = the text's continuation (or None)."""
        path = Path(path) if path is not None else demo_path("generation")
        opt = self.options
        records = read_records(path)
        names = list(dict.fromkeys(k for rec in records[:50] for k in rec.fields))
        field = opt.text_field or next((n for n in ("prompt", "text") if n in names), None)
        if field is None or field not in names:
            want = field or "prompt"
            raise DataError(path, records[0].line, want, missing_reason(want, names))
        records = check_fields(records, [field], {field: str})
        ref_field = next((n for n in REFERENCE_FIELDS if n in names), None)
        examples = []
        for rec in records:
            text = clean_input(rec[field])
            if len(text) < max(opt.min_chars, 1):
                continue
            if field == "prompt" or opt.prompt_words is None:
                opening, rest = text, rec.fields.get(ref_field) if ref_field else None
            else:
                words = text.split(" ")
                opening = " ".join(words[: opt.prompt_words])
                rest = " ".join(words[opt.prompt_words: opt.prompt_words + opt.reference_words]) or None
            fields = {"label": rec.fields["label"]} if "label" in rec.fields else {}
            examples.append(Example(prompt=self.format_prompt(opening), reference=rest or None, fields=fields,
                                    source=rec.source, line=rec.line))
        if not examples:
            raise DataError(path, None, None, f"no text is at least {opt.min_chars} characters long (min_chars)")
        return examples

    def format_prompt(self, text: str) -> str:
        """The user message for an opening ``text``."""
        return self.options.instruction.replace("{text}", text)

    def reward_functions(self) -> list[tuple[RewardFn, float]]:
        if self.options.reward_model is not None:
            return [(self._reward_model_scores, 1.0)]
        target = self.options.target_sentiment

        def reward(prompts, completions, **fields):
            return sentiment_reward(prompts, completions, target=target)

        return [(reward, 1.0)]

    def _reward_model_scores(self, prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
        """Reward-model score of prompt + completion, (B,) floats (model loaded once, on first use)."""
        from ppolm.models import (  # deferred: torch is only needed with a model
            load_model,
            load_tokenizer,
        )
        from ppolm.rewards.compose import reward_model_scores

        if self._rm is None:
            model = load_model(self.options.reward_model, kind="seqcls")
            model.requires_grad_(False)
            model.eval()
            self._rm = (model, load_tokenizer(self.options.reward_model))
        texts = [p + c for p, c in zip(prompts, completions)]
        return reward_model_scores(self._rm[0], self._rm[1], texts).tolist()

    def metrics(self, examples: Sequence[Example], completions: Sequence[str], **extra: Any) -> dict[str, Any]:
        """reward_mean, kl_mean, distinct_1/2, length_mean_words (generation_metrics); positive_rate = share
        of completions the lexicon scores > 0; with ``ref_nll`` (B,) summed NLL under the reference model and
        ``ref_tokens`` (B,) token counts, perplexity = exp(sum ref_nll / sum ref_tokens) (token-weighted)."""
        rewards = extra.get("rewards")
        if rewards is None:
            rewards = self.reward_functions()[0][0]([ex.prompt for ex in examples], list(completions),
                                                    **self.row_fields(examples))
        out = generation_metrics(list(completions), rewards, extra.get("kls"))
        out["positive_rate"] = (sum(sentiment_score(c) > 0 for c in completions) / len(completions)
                                if completions else None)
        nll, tokens = extra.get("ref_nll"), extra.get("ref_tokens")
        out["perplexity"] = None
        if nll is not None and tokens is not None and sum(tokens) > 0:
            out["perplexity"] = math.exp(sum(nll) / sum(tokens))
        return out

    def example_scores(self, examples: Sequence[Example], completions: Sequence[str], **extra: Any) -> list[dict]:
        """Per example: lexicon sentiment score, and KL / perplexity under the reference when computed."""
        kls, nll, tokens = extra.get("kls"), extra.get("ref_nll"), extra.get("ref_tokens")
        out = []
        for i, c in enumerate(completions):
            row: dict[str, Any] = {"sentiment": sentiment_score(c)}
            if kls is not None:
                row["kl"] = kls[i]
            if nll is not None and tokens is not None and tokens[i]:
                row["perplexity"] = math.exp(nll[i] / tokens[i])
            out.append(row)
        return out
