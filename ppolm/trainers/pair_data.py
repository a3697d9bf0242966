"""The preference pairs of a pair trainer (`ppolm rm`, `ppolm dpo`): read (or the built-in demo pairs), split into
training and held-out pairs as both trainers do it, tokenized by the trainer's own tokenizer function."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from ppolm.data.preferences import PreferencePair, demo_preferences, read_preferences, write_preferences
from ppolm.errors import DataError
from ppolm.trainers.common import split_held_out
from ppolm.trainers.resume import data_fingerprint

T = TypeVar("T")


def load_pair_splits(cfg: Any, tokenizer: PreTrainedTokenizerBase, is_main: bool,
                     tokenize: Callable[..., tuple[list[T], int]], name: str) -> tuple[list[T], list[T], str]:
    """(training pairs, held-out pairs, fingerprint of the training pairs). `cfg` has the pair trainers' data
    keys (data, eval_data, eval_fraction, limit, seed, demo_pairs, demo_chars, use_chat_template, system_prompt,
    max_length); `tokenize(pairs, tokenizer, **kw)` returns (tokenized pairs, number dropped as too long);
    `name` prefixes the console line about dropped pairs."""
    if cfg.data is None:
        pairs = demo_preferences(cfg.demo_pairs, seed=0, chars=cfg.demo_chars)
        if is_main:  # so the demo data can be read like any other file
            write_preferences(pairs, Path(cfg.output_dir) / "demo_preferences.jsonl")
    else:
        pairs = read_preferences(cfg.data)
    held: list[PreferencePair]
    if cfg.eval_data is not None:
        train, held = pairs, read_preferences(cfg.eval_data)
    else:
        train, held = split_held_out(pairs, cfg.eval_fraction, cfg.seed)
    train = train[: cfg.limit]
    fingerprint = data_fingerprint([f"{p.prompt}\0{p.chosen}\0{p.rejected}" for p in train])
    kw = dict(use_chat_template=cfg.use_chat_template, system_prompt=cfg.system_prompt, max_length=cfg.max_length)
    train_t, dropped = tokenize(train, tokenizer, **kw)
    held_t, held_dropped = tokenize(held, tokenizer, **kw)
    if dropped or held_dropped:
        print(f"{name}: dropped {dropped} training and {held_dropped} held-out pairs with a side longer than "
              f"max_length={cfg.max_length} tokens")
    if not train_t:
        raise DataError(cfg.data or "demo pairs", None, None, f"no pair fits max_length={cfg.max_length} tokens")
    return train_t, held_t, fingerprint
