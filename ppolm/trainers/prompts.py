"""Prompt data for RL: task examples -> chat-templated, tokenized prompts, and a deterministic sampler.

The sampler's order depends only on (seed, epoch), and the rows of step s are positions
[s * G, (s + 1) * G) of that order (G = global batch): resume and any process count read the same rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ppolm.data.collate import apply_chat_template
from ppolm.tasks.base import Example


@dataclass(frozen=True)
class PromptSet:
    """examples and their templated prompt text / token ids (same order)."""

    examples: list[Example]
    texts: list[str]
    token_ids: list[list[int]]
    dropped_too_long: int


def build_prompts(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    system_prompt: str | None,
    use_chat_template: bool,
    max_prompt_tokens: int,
) -> PromptSet:
    """Template and tokenize every example; drop (and count) prompts longer than max_prompt_tokens."""
    kept, texts, ids, dropped = [], [], [], 0
    for ex in examples:
        text = apply_chat_template(tokenizer, ex.prompt, system_prompt) if use_chat_template else ex.prompt
        tok = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tok) > max_prompt_tokens:
            dropped += 1
            continue
        kept.append(ex)
        texts.append(text)
        ids.append(tok)
    return PromptSet(kept, texts, ids, dropped)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of range(n) that depends only on (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=gen)


def step_rows(n: int, seed: int, step: int, global_batch: int, rank: int, local_batch: int) -> list[tuple[int, int]]:
    """(global position, example index) of this process's rows at `step` (0-based)."""
    rows = []
    start = step * global_batch + rank * local_batch
    for pos in range(start, start + local_batch):
        epoch, offset = divmod(pos, n)
        rows.append((pos, int(epoch_order(n, seed, epoch)[offset])))
    return rows
