"""Turn prompts into model inputs: chat templates and padding into rectangular batches.

Generation pads on the left so that every prompt ends at the last column and new tokens are appended
at the same position for the whole batch; training and scoring pad on the right.
"""

from __future__ import annotations

from typing import Any

import torch


def apply_chat_template(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """Wrap ``prompt`` (and an optional ``system`` message) in the tokenizer's chat template.

    Returns the template's text with the generation prompt appended (the assistant turn is open).
    A tokenizer without ``chat_template`` (a base model) gets ``prompt`` back unchanged; ``system`` is
    then ignored, since there is no turn structure to put it in. Templates that reject a system role
    get the system text prepended to the user message instead.
    """
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = [{"role": "user", "content": prompt}]
    if system:
        try:
            return tokenizer.apply_chat_template([{"role": "system", "content": system}, *messages],
                                                 tokenize=False, add_generation_prompt=True)
        except Exception:  # jinja2 TemplateError ("System role not supported") and similar
            messages = [{"role": "user", "content": f"{system}\n\n{prompt}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def left_pad_collate(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``input_ids`` (B, P) and ``attention_mask`` (B, P), both int64.

    P is the longest sequence; ``attention_mask`` is 1 on real tokens and 0 on padding.
    """
    return _pad(sequences, pad_id, left=True)


def right_pad_collate(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` (B, P) and ``attention_mask`` (B, P), both int64."""
    return _pad(sequences, pad_id, left=False)


def _pad(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not sequences:
        raise ValueError("cannot collate an empty batch")
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(width - n, width) if left else slice(0, n)
        input_ids[i, cols] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[i, cols] = 1
    return input_ids, attention_mask
