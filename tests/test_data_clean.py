"""Cleaning with counted drops, token-length filtering, chat templates and padding."""

from __future__ import annotations

import pytest
import torch

from ppolm.data import (
    Record, apply_chat_template, clean_records, clean_text, filter_by_tokens, left_pad_collate, right_pad_collate,
)
from ppolm.errors import DataError


def _recs(*texts: object, field: str = "text") -> list[Record]:
    return [Record({field: t, "label": i}, "f.jsonl", i + 1) for i, t in enumerate(texts)]


def test_clean_text_normalises_unicode_and_whitespace() -> None:
    assert clean_text("  cafe\u0301 \n\t au\u00a0lait  ") == "caf\u00e9 au lait"  # NFC joins e + accent
    assert clean_text("\ufb01ne", normalize="NFKC") == "fine"  # ligature only folds under NFKC
    assert clean_text("\ufb01ne") == "\ufb01ne"


def test_clean_records_counts_every_drop_reason() -> None:
    records = _recs("good one", "", None, "  ", "x", "caf\u00e9  au lait", "cafe\u0301 au   lait", "far too long text")
    kept, stats = clean_records(records, text_fields=["text"], min_chars=2, max_chars=15)
    assert [r["text"] for r in kept] == ["good one", "caf\u00e9 au lait"]
    assert stats.dropped == {"empty": 3, "too_short": 1, "too_long": 1, "duplicate": 1}
    assert stats.rows_in == stats.rows_kept + stats.rows_dropped == 8
    assert stats.changed == 1  # the kept café row lost a double space
    assert kept[1].line == 6 and kept[1]["label"] == 5  # provenance and other fields survive


def test_dedupe_uses_all_text_fields_and_can_be_off() -> None:
    targets = ["嗨。", "你好。", "嗨。"]
    records = [Record({"source": "Hi.", "target": t}, "p.tsv", i) for i, t in enumerate(targets, 1)]
    kept, stats = clean_records(records, text_fields=["source", "target"])
    assert [r["target"] for r in kept] == ["嗨。", "你好。"] and stats.dropped["duplicate"] == 1
    kept, stats = clean_records(records, text_fields=["source", "target"], dedupe=False)
    assert len(kept) == 3 and stats.rows_dropped == 0


def test_list_fields_keep_token_alignment() -> None:
    records = [Record({"tokens": ["Cafe\u0301", "  "], "tags": ["B-LOC", "O"]}, "n.conll", 1),
               Record({"tokens": [], "tags": []}, "n.conll", 4)]
    kept, stats = clean_records(records, text_fields=["tokens"])
    assert kept[0]["tokens"] == ["Caf\u00e9", "  "] and kept[0]["tags"] == ["B-LOC", "O"]
    assert stats.dropped["empty"] == 1


def test_clean_errors_name_file_line_and_field() -> None:
    with pytest.raises(DataError, match=r"^f\.jsonl:2: field 'text': missing text field$"):
        clean_records([Record({"text": "a"}, "f.jsonl", 1), Record({"body": "b"}, "f.jsonl", 2)], text_fields=["text"])
    with pytest.raises(DataError, match=r"^f\.jsonl:1: field 'text': expected text, found int$"):
        clean_records(_recs(3), text_fields=["text"])
    with pytest.raises(DataError, match=r"^f\.jsonl: all 3 rows were filtered out \(empty=1, too_short=2,"):
        clean_records(_recs("", "a", "b"), text_fields=["text"], min_chars=2)


def test_filter_by_tokens() -> None:
    records = _recs("a", "b", "c")
    kept, dropped = filter_by_tokens(records, [3, 9, 5], max_tokens=5)
    assert [r["text"] for r in kept] == ["a", "c"] and dropped == 1
    with pytest.raises(DataError, match="all 3 rows were filtered out .*max_tokens=2, shortest row has 3"):
        filter_by_tokens(records, [3, 9, 5], max_tokens=2)
    with pytest.raises(ValueError):
        filter_by_tokens(records, [1], max_tokens=2)


def test_left_and_right_padding() -> None:
    ids, mask = left_pad_collate([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = right_pad_collate([[5, 6, 7], [8]], pad_id=-1)
    assert ids.tolist() == [[5, 6, 7], [8, -1, -1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError):
        left_pad_collate([], pad_id=0)


def _tokenizer(template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "hi": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    tok.chat_template = template
    return tok


def test_apply_chat_template() -> None:
    plain = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
             "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = _tokenizer(plain)
    assert apply_chat_template(tok, "Hi there") == "<user>Hi there\n<assistant>"
    assert apply_chat_template(tok, "Hi", system="Be brief.") == "<system>Be brief.\n<user>Hi\n<assistant>"
    strict = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              + plain)
    assert apply_chat_template(_tokenizer(strict), "Hi", system="Be brief.") == "<user>Be brief.\n\nHi\n<assistant>"
    assert apply_chat_template(_tokenizer(None), "Hi there", system="ignored") == "Hi there"
