"""Per-example task rewards: plain functions from completions to floats in [0, 1].

Every reward function has the signature ``fn(prompts, completions, **row_fields) -> list[float]``:
``prompts`` and ``completions`` are (B,) strings and each row field (``label=``, ``entities=``,
``reference=``) is a (B,) list taken from the dataset rows. Unused row fields are accepted and
ignored, so a trainer can pass every column of a batch. Settings that are not per-example
(``partial_credit``, ``metric``, ``target_words``...) are bound once with ``get_reward_function(name,
**settings)``.

The metric helpers (label matching, entity F1, chrF/BLEU) live in ``ppolm.eval``'s leaf metric
modules so that a reward and its evaluation metric cannot drift apart.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from ppolm.errors import ConfigError
from ppolm.eval.metrics import label_from_completion, label_set, labels_in_completion
from ppolm.eval.mt_metrics import sentence_bleu, sentence_chrf
from ppolm.eval.ner_metrics import parse_entities, sentence_entity_f1
from ppolm.rewards.label_judge import label_judge_reward

RewardFn = Callable[..., list[float]]


def _check_lengths(completions: Sequence[str], **fields: Sequence[Any]) -> None:
    for name, values in fields.items():
        if len(values) != len(completions):
            raise ValueError(f"row field '{name}' has {len(values)} items for {len(completions)} completions")


def classification_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    label: Sequence[str],
    labels_all: Sequence[str] | Sequence[Sequence[str]] | None = None,
    partial_credit: float = 0.0,
    wrong_label_reward: float = 0.0,
    **_unused: Any,
) -> list[float]:
    """1 if the first label word of the completion is the gold label, else partial credit, the wrong-label
    reward or 0.

    r_i = 1                   if label_from_completion(c_i, labels_all) == label_i
        = partial_credit      if label_i occurs in c_i (whole word, any case) but another label comes first
        = wrong_label_reward  if c_i names only other labels
        = 0                   if c_i names no label.
    ``labels_all`` is the full label set, given once (``["negative", "positive"]``) or as the classification
    task's row field, one label list per row (what ``reward.functions: [{name: classification}]`` receives);
    without it, the distinct gold labels of this batch are used, which misses labels absent from the batch --
    pass it whenever it is known.
    """
    _check_lengths(completions, label=label)
    labels = label_set(labels_all)
    candidates = labels if labels is not None else sorted(set(label))
    rewards = []
    for completion, gold in zip(completions, label):
        first = label_from_completion(completion, candidates + [gold])
        if first is not None and first.lower() == gold.lower():
            rewards.append(1.0)
        elif any(f.lower() == gold.lower() for f in labels_in_completion(completion, candidates + [gold])):
            rewards.append(float(partial_credit))
        elif first is not None:
            rewards.append(float(wrong_label_reward))
        else:
            rewards.append(0.0)
    return rewards


def _as_entities(entities: Sequence[Any]) -> list[tuple[str, str]]:
    # Rows read from JSON hold entities as [type, text] lists or {"type", "text"} dicts.
    pairs = []
    for e in entities:
        if isinstance(e, Mapping):
            pairs.append((str(e["type"]), str(e["text"])))
        else:
            etype, text = e
            pairs.append((str(etype), str(text)))
    return pairs


def ner_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    entities: Sequence[Sequence[Any]],
    type_map: Mapping[str, str] | None = None,
    **_unused: Any,
) -> list[float]:
    """Sentence entity F1 between ``parse_entities(completion)`` and the gold (type, text) entities.

    r_i = F1 of the multisets {(type, normalized text)}; 1.0 when both are empty (a correct "none").
    """
    _check_lengths(completions, entities=entities)
    return [
        sentence_entity_f1(_as_entities(gold), parse_entities(completion, type_map))
        for completion, gold in zip(completions, entities)
    ]


def translation_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    reference: Sequence[str],
    metric: str = "chrf",
    target_lang: str | None = None,
    **_unused: Any,
) -> list[float]:
    """Sentence chrF (default), chrF with beta = 1 ('chrf1') or sentence BLEU of each completion against its
    reference, / 100."""
    _check_lengths(completions, reference=reference)
    if metric in ("chrf", "chrf1"):
        beta = 1 if metric == "chrf1" else 2
        return [sentence_chrf(c.strip(), r, beta) / 100.0 for c, r in zip(completions, reference)]
    if metric == "bleu":
        return [sentence_bleu(c.strip(), r, target_lang) / 100.0 for c, r in zip(completions, reference)]
    raise ConfigError(f"translation_reward metric must be 'chrf', 'chrf1' or 'bleu', got {metric!r}")


def length_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    target_words: int = 20,
    **_unused: Any,
) -> list[float]:
    """Toy reward for tiny models: r = max(0, 1 - |n_words - target_words| / target_words)."""
    if target_words <= 0:
        raise ConfigError(f"length_reward target_words must be > 0, got {target_words}")
    return [max(0.0, 1.0 - abs(len(c.split()) - target_words) / target_words) for c in completions]


_WORD = re.compile(r"\w+(?:'\w+)?")


def contains_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    words: Collection[str] = ("good", "great", "happy", "love", "wonderful"),
    **_unused: Any,
) -> list[float]:
    """Toy reward for tiny models: fraction of the completion's words that are in ``words``.

    r = |{tokens t of c : lower(t) in words}| / |tokens of c| (0 for an empty completion); tokens are
    runs of word characters, so punctuation does not count as a word.
    """
    vocab = {w.lower() for w in words}
    rewards = []
    for completion in completions:
        tokens = _WORD.findall(completion.lower())
        rewards.append(sum(t in vocab for t in tokens) / len(tokens) if tokens else 0.0)
    return rewards


REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "classification": classification_reward,
    "ner": ner_reward,
    "translation": translation_reward,
    "length": length_reward,
    "contains": contains_reward,
    "label_judge": label_judge_reward,
}


def get_reward_function(name: str, **settings: Any) -> RewardFn:
    """The reward function registered as ``name``, with ``settings`` bound as keyword arguments.

    Raises ``ConfigError`` naming the allowed names for an unknown ``name``, and the allowed settings
    for a setting the function does not take (checked now, not at the first batch).
    """
    if name not in REWARD_FUNCTIONS:
        raise ConfigError(f"unknown reward function {name!r}; allowed: {', '.join(sorted(REWARD_FUNCTIONS))}")
    fn = REWARD_FUNCTIONS[name]
    if not settings:
        return fn
    params = inspect.signature(fn).parameters
    allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ConfigError(
            f"reward function {name!r} has no setting(s) {unknown}; allowed: {', '.join(allowed)}"
        )
    validate = getattr(fn, "validate", None)  # settings that need more than a name check (label_judge)
    if validate is not None:
        validate(settings)
    return functools.partial(fn, **settings)
