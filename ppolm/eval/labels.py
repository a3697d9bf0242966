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
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ppolm.data.collate import left_pad_collate, right_pad_collate
from ppolm.models.policy import autocast_ctx, lm_logits_fp32, score_tokens
from ppolm.rollout import position_ids_from_mask


def spellings(word: str) -> list[str]:
    """The word as given, lowercased and capitalized, without duplicates: 'Sci/Tech' -> 3 spellings."""
    return list(dict.fromkeys([word, word.lower(), word[:1].upper() + word[1:]]))


def _candidates(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str], case_variants: bool) -> list[tuple[int, list[int]]]:
    """(label index, token ids) per spelling; identical token sequences are scored once."""
    out: list[tuple[int, list[int]]] = []
    for c, word in enumerate(labels):
        seen: set[tuple[int, ...]] = set()
        for text in spellings(word) if case_variants else [word]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids and tuple(ids) not in seen:
                seen.add(tuple(ids))
                out.append((c, ids))
    return out


def _combine(labels: Sequence[str], candidates: list[tuple[int, list[int]]], cand_logprobs: torch.Tensor) -> torch.Tensor:
    """(B, K) log-probs of the K spellings -> (B, C): logsumexp over the spellings of each label."""
    out = torch.full((cand_logprobs.shape[0], len(labels)), float("-inf"))
    for k, (c, _) in enumerate(candidates):
        out[:, c] = torch.logaddexp(out[:, c], cand_logprobs[:, k])
    return out


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

    One forward over a batch of prompts fills a KV cache and gives every spelling's first token; the cache
    is then repeated once per spelling (K of them) and one short forward over the remaining label tokens
    gives the rest. That is ~1 prompt forward instead of K: the same numbers as scoring each (prompt,
    spelling) row with ``score_tokens`` (``label_logprobs_reference``, compared in the tests).
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    candidates = _candidates(tokenizer, labels, case_variants)
    K = len(candidates)
    rows = []
    for lo in range(0, len(prompt_ids), batch_size):
        x, m = left_pad_collate([list(p) for p in prompt_ids[lo: lo + batch_size]], pad)
        x, m = x.to(device), m.to(device)
        B = x.shape[0]
        cache = DynamicCache()
        with autocast_ctx(autocast_dtype, device):
            out = model(input_ids=x, attention_mask=m, position_ids=position_ids_from_mask(m), cache=cache,
                        use_cache=True, output_hidden_states=True, logits_to_keep=1)
        first = torch.log_softmax(lm_logits_fp32(model, out.hidden_states[-1][:, -1:]), -1)[:, 0]  # (B, V)
        scores = torch.stack([first[:, ids[0]] for _, ids in candidates], 1)  # (B, K)
        feed, f_mask = right_pad_collate([ids[:-1] for _, ids in candidates], pad)  # (K, L) inputs
        target, _ = right_pad_collate([ids[1:] for _, ids in candidates], pad)       # (K, L) next tokens
        L = feed.shape[1]
        if L:
            # Row b*K + k continues prompt b with spelling k (batch_repeat_interleave repeats rows in place).
            cache = out.cache
            cache.batch_repeat_interleave(K)
            feed, f_mask, target = (t.repeat(B, 1).to(device) for t in (feed, f_mask, target))
            attn = torch.cat([m.repeat_interleave(K, 0), f_mask], 1)
            pos = m.sum(-1, keepdim=True).repeat_interleave(K, 0) + torch.arange(L, device=device)
            with autocast_ctx(autocast_dtype, device):
                cont = model(input_ids=feed, attention_mask=attn, position_ids=pos, cache=cache,
                             use_cache=True, output_hidden_states=True)
            logp = torch.log_softmax(lm_logits_fp32(model, cont.hidden_states[-1]), -1)  # (B*K, L, V)
            tok = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * f_mask  # (B*K, L)
            scores = scores + tok.sum(-1).view(B, K)
        rows.append(scores.float().cpu())
    return _combine(labels, candidates, torch.cat(rows))


@torch.no_grad()
def label_logprobs_reference(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    labels: Sequence[str],
    *,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    case_variants: bool = True,
) -> torch.Tensor:
    """``label_logprobs`` the plain way: each (prompt, spelling) pair is one ``score_tokens`` row, the
    prompt left-padded and the label right-padded after it. K times the compute; kept as the test oracle."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    candidates = _candidates(tokenizer, labels, case_variants)
    pairs = [(b, ids) for b in range(len(prompt_ids)) for _, ids in candidates]
    values = []
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo: lo + batch_size]
        p_ids, p_mask = left_pad_collate([list(prompt_ids[b]) for b, _ in chunk], pad)
        r_ids, r_mask = right_pad_collate([ids for _, ids in chunk], pad)
        scores = score_tokens(model, torch.cat([p_ids, r_ids], 1).to(device), torch.cat([p_mask, r_mask], 1).to(device),
                              r_ids.to(device), autocast_dtype=autocast_dtype)
        values.append((scores.logprobs.float().cpu() * r_mask.float()).sum(-1))
    return _combine(labels, candidates, torch.cat(values).view(len(prompt_ids), len(candidates)))


def label_probabilities(logprobs: torch.Tensor) -> torch.Tensor:
    """softmax over labels of (B, C) log-probs -> (B, C), rows summing to 1."""
    return torch.softmax(logprobs, dim=-1)
