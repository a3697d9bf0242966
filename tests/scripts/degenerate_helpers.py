"""Helpers for the degenerate-batch tests: a tiny model that can only say EOS, and odd reward functions
(importable as 'degenerate_helpers:<name>' when tests/scripts is on the Python path)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ppolm.models.tiny import tiny_model


def eos_only_model(out: str | Path) -> str:
    """Save a tiny Llama whose every next-token distribution puts all its mass on EOS; returns the directory.

    Attention and MLP outputs are zeroed, so the final hidden state is the (normalized) input embedding. Every
    embedding row is v = 10 * ones and EOS's row is 2v; with tied weights each logit is ones . row, i.e. 640
    for any token and 1280 for EOS: exp(-640) underflows, so sampling at any temperature returns EOS.
    """
    model, tokenizer = tiny_model("tiny-random-llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.get_input_embeddings().weight
        emb.fill_(10.0)
        emb[tokenizer.eos_token_id] = 20.0
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def constant_reward(prompts: Sequence[str], completions: Sequence[str], *, value: float = 1.0, **_: Any) -> list[float]:
    """The same score for every completion: no learning signal at all."""
    return [value] * len(completions)


def nonfinite_reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
    """NaN, +inf, -inf for the first three rows, distinct finite scores 0.1 * i for the others."""
    bad = [math.nan, math.inf, -math.inf]
    return [bad[i] if i < 3 else 0.1 * i for i in range(len(completions))]


def all_nan_reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
    """NaN for every completion."""
    return [math.nan] * len(completions)
