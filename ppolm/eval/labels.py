"""Label-word probabilities: how likely the model is to answer each label, scored as a continuation.

For prompt x and label words w_1..w_C, each word is tokenized as the start of the answer and scored with
``score_tokens``: log p(w_c | x) = sum_t log pi(w_c,t | x, w_c,<t). A label can be written several ways
("positive", "Positive"); the spellings' probabilities are added (logsumexp of their log-probs) since
any of them is the same answer. Then

    P(c | x) = softmax_c log p(w_c | x)

renormalizes over the label set. These scores give ROC-AUC (a ranking measure that greedy answers alone
cannot give) and the accuracy of argmax_c P(c | x), which does not depend on answer formatting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ppolm.data.collate import left_pad_collate, right_pad_collate
from ppolm.models.policy import score_tokens


def spellings(word: str) -> list[str]:
    """The word as given, lowercased and capitalized, without duplicates: 'Sci/Tech' -> 3 spellings."""
    return list(dict.fromkeys([word, word.lower(), word[:1].upper() + word[1:]]))


@torch.no_grad()
def label_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    labels: Sequence[str],
    *,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    case_variants: bool = True,
) -> torch.Tensor:
    """log p(label_c | prompt_b) for every prompt and label. prompt_ids: B token lists -> (B, C) fp32.

    Each (prompt, label spelling) pair is one row: the prompt left-padded, the label tokens right-padded
    after it, so the label sits in the last R columns as ``score_tokens`` expects. Rows run in chunks of
    ``batch_size``; the rows of one prompt are adjacent, so prompts sorted by length pad little.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # (label index, token ids) per spelling; identical token sequences are scored once.
    candidates: list[tuple[int, list[int]]] = []
    for c, word in enumerate(labels):
        seen: set[tuple[int, ...]] = set()
        for text in spellings(word) if case_variants else [word]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids and tuple(ids) not in seen:
                seen.add(tuple(ids))
                candidates.append((c, ids))
    pairs = [(b, cand) for b in range(len(prompt_ids)) for cand in candidates]
    out = torch.full((len(prompt_ids), len(labels)), float("-inf"))
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo: lo + batch_size]
        p_ids, p_mask = left_pad_collate([list(prompt_ids[b]) for b, _ in chunk], pad)
        r_ids, r_mask = right_pad_collate([ids for _, (_, ids) in chunk], pad)
        scores = score_tokens(
            model, torch.cat([p_ids, r_ids], 1).to(device), torch.cat([p_mask, r_mask], 1).to(device),
            r_ids.to(device), autocast_dtype=autocast_dtype,
        )
        seq = (scores.logprobs.float().cpu() * r_mask.float()).sum(-1)  # (rows,) log p(spelling | prompt)
        for (b, (c, _)), value in zip(chunk, seq):
            out[b, c] = torch.logaddexp(out[b, c], value)
    return out


def label_probabilities(logprobs: torch.Tensor) -> torch.Tensor:
    """softmax over labels of (B, C) log-probs -> (B, C), rows summing to 1."""
    return torch.softmax(logprobs, dim=-1)
