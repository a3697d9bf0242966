"""A dense classification reward read by a frozen judge LM from the sampled answer.

The 0/1 label reward says only right or wrong. ``label_judge`` grades every sampled answer by how clearly it
gives the gold label: a frozen causal LM (the judge, by default the embedded base model) reads the prompt,
the sampled completion and a short question, and the reward is the judge's probability of the gold label
word as the answer to that question, renormalized over the label words:

    r_i = P_J(gold_i | prompt_i + completion_i + question) = softmax_c log p_J(w_c | ...)[gold_i]   in [0, 1]

(``form: margin`` gives instead log p_J(gold) - max_{c != gold} log p_J(w_c), unbounded.)

Why the judge reads the completion: a reward made from the *policy's own* label probabilities given the
prompt alone (p(gold | prompt)) is the same for every sampled answer of a prompt, so its policy gradient
E[(r - b) grad log pi(answer)] is zero (docs/implementation-details.md, item 22). Reading the sampled answer
makes the reward depend on what was said: "Positive." scores near 1 for a positive gold label, an answer
that chatters but leans the right way scores in between, instead of 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ppolm.eval.metrics import label_set

DEFAULT_QUESTION = "\nIn one word, the answer above is:\n"
FORMS = ("prob", "margin")

_JUDGES: dict[str, tuple[Any, Any, Any]] = {}  # judge name -> (model, tokenizer, autocast dtype), loaded once


def _judge(name: str) -> tuple[Any, Any, Any]:
    """The frozen judge model, its tokenizer and autocast dtype; loaded at the first batch, then kept."""
    if name not in _JUDGES:
        from ppolm.models.load import load_model, load_tokenizer
        from ppolm.runtime import autocast_dtype

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        amp = autocast_dtype("auto", device)
        model = load_model(name, precision="bf16" if amp == torch.bfloat16 else "fp32").to(device)
        model.requires_grad_(False)
        model.eval()
        _JUDGES[name] = (model, load_tokenizer(name), amp)
    return _JUDGES[name]


def judge_scores(label_logprobs: torch.Tensor, gold: Sequence[int], form: str = "prob") -> list[float]:
    """Rewards from the judge's (B, C) label log-probs and the gold label index of each row.

    prob:   softmax_c(label_logprobs)[b, gold_b]                            in [0, 1]
    margin: label_logprobs[b, gold_b] - max_{c != gold_b} label_logprobs[b, c]   (C >= 2)
    """
    idx = torch.as_tensor(list(gold), dtype=torch.long)
    rows = torch.arange(label_logprobs.shape[0])
    if form == "prob":
        return torch.softmax(label_logprobs.float(), -1)[rows, idx].tolist()
    others = label_logprobs.float().clone()
    others[rows, idx] = float("-inf")
    return (label_logprobs.float()[rows, idx] - others.max(-1).values).tolist()


def label_judge_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    label: Sequence[str],
    labels_all: Sequence[Any] | None = None,
    judge: str = "smollm2-135m-instruct",
    question: str = DEFAULT_QUESTION,
    form: str = "prob",
    batch_size: int = 16,
    **_unused: Any,
) -> list[float]:
    """The judge's probability (or log-prob margin) of the gold label after reading prompt + completion.

    judge: model name or directory (loaded once, frozen; bf16 where the hardware runs it).
    question: text put after the completion; the label words are scored as its continuation.
    form: 'prob' (in [0, 1], the scale of the 0/1 reward) or 'margin' (log-prob margin over the best other label).
    """
    from ppolm.eval.labels import label_logprobs  # transformers-heavy: only when the reward is used

    if len(label) != len(completions):
        raise ValueError(f"row field 'label' has {len(label)} items for {len(completions)} completions")
    if form not in FORMS:  # before the judge loads (config files are checked earlier, by _validate)
        raise ValueError(f"label_judge: form must be 'prob' or 'margin', got {form!r}")
    words = label_set(labels_all) or sorted(set(label))
    known = {w.lower() for w in words}
    words += sorted({g for g in label if g.lower() not in known})
    lower = [w.lower() for w in words]
    model, tok, amp = _judge(judge)
    ids = [tok(p + c + question, add_special_tokens=False)["input_ids"] for p, c in zip(prompts, completions)]
    logprobs = label_logprobs(model, tok, ids, words, batch_size=batch_size, autocast_dtype=amp)
    return judge_scores(logprobs, [lower.index(g.lower()) for g in label], form)


def _validate(settings: dict[str, Any]) -> None:
    """Reject bad settings when the config is read, before any model loads."""
    from ppolm.errors import ConfigError
    from ppolm.models.load import resolve

    form = settings.get("form", "prob")
    if form not in FORMS:
        raise ConfigError(f"reward function 'label_judge': form must be 'prob' or 'margin', got {form!r}")
    resolve(str(settings.get("judge", "smollm2-135m-instruct")))  # an unknown model name fails here


label_judge_reward.validate = _validate  # type: ignore[attr-defined]
