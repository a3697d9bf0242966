"""Clean records before training: normalise text, drop unusable rows, and count every drop by reason.

Nothing is dropped silently: ``CleanStats.dropped`` holds a count for each reason, and a filter that
removes every row raises a ``DataError`` that lists those counts instead of returning an empty dataset.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppolm.data.readers import Record
from ppolm.errors import DataError

DROP_REASONS = ("empty", "too_short", "too_long", "duplicate")
_NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD")
_SPACES = re.compile(r"\s+")
_PUNCT = "".join(chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum())


@dataclass
class CleanStats:
    """Counts of one cleaning pass; ``rows_in == rows_kept + sum(dropped.values())``."""

    rows_in: int = 0
    rows_kept: int = 0
    # rows whose text was changed (Unicode normalisation or whitespace) but kept
    changed: int = 0
    # reason -> number of rows dropped for it; every reason of DROP_REASONS is present, maybe 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        """``'empty=2, too_short=0, too_long=0, duplicate=5'``."""
        return ", ".join(f"{reason}={count}" for reason, count in self.dropped.items())


def clean_text(text: str, normalize: str | None = "NFC") -> str:
    """Unicode-normalise ``text``, turn every run of whitespace (newlines included) into one space, strip."""
    if normalize:
        text = unicodedata.normalize(normalize, text)
    return _SPACES.sub(" ", text).strip()


def load_stop_words(spec: str) -> frozenset[str]:
    """'english' = scikit-learn's English list (318 words); anything else is a UTF-8 file, one word a line
    ('#' starts a comment). Raises ConfigError naming the file."""
    from ppolm.errors import ConfigError

    if spec == "english":
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        return frozenset(ENGLISH_STOP_WORDS)
    try:
        lines = Path(spec).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"stop_words: '{spec}' is neither 'english' nor a readable UTF-8 word list ({exc})") from None
    words = frozenset(w.strip().lower() for w in lines if w.strip() and not w.lstrip().startswith("#"))
    if not words:
        raise ConfigError(f"stop_words: '{spec}' holds no words")
    return words


def remove_stop_words(text: str, stop_words: frozenset[str]) -> str:
    """Drop the words of ``text`` (split on spaces) whose lower-case form, stripped of punctuation, is a stop
    word; the other words keep their case and punctuation. ``"The film is great."`` -> ``"film great."``."""
    kept = [w for w in text.split(" ") if w.strip(_PUNCT).lower() not in stop_words]
    return " ".join(kept)


def clean_records(
    records: list[Record],
    *,
    text_fields: list[str],
    min_chars: int = 1,
    max_chars: int | None = None,
    dedupe: bool = True,
    normalize: str | None = "NFC",
) -> tuple[list[Record], CleanStats]:
    """Clean ``text_fields`` of every record and drop rows that are empty, too short, too long or repeated.

    A text field is a string (cleaned with ``clean_text``) or a list of strings such as CoNLL tokens
    (each normalised, never merged or split, so tags stay aligned; length = characters joined by spaces).
    A row is dropped for the first reason that applies, checked in the order of ``DROP_REASONS``:
    any text field empty, shorter than ``min_chars``, longer than ``max_chars``, or the same cleaned
    text fields as an earlier kept row (``dedupe``). A null text counts as empty.
    Raises ``DataError`` for a missing or non-text field, and when every row is dropped.
    """
    if not text_fields:
        raise ValueError("text_fields must name at least one field (duplicates are found on them)")
    if normalize is not None and normalize not in _NORMAL_FORMS:
        raise ValueError(f"normalize must be one of {_NORMAL_FORMS} or None, not {normalize!r}")
    stats = CleanStats(rows_in=len(records))
    seen: set[tuple[Any, ...]] = set()
    kept: list[Record] = []
    for rec in records:
        fields = dict(rec.fields)
        lengths = []
        for name in text_fields:
            fields[name] = _clean_value(rec, name, normalize)
            value = fields[name]
            lengths.append(len(" ".join(value)) if isinstance(value, list) else len(value))
        reason = _drop_reason(lengths, min_chars, max_chars)
        if reason is None and dedupe:
            key = tuple(tuple(v) if isinstance(v, list) else v for v in (fields[n] for n in text_fields))
            reason = "duplicate" if key in seen else None
            seen.add(key)
        if reason is not None:
            stats.dropped[reason] += 1
            continue
        if any(fields[n] != rec.fields[n] for n in text_fields):
            stats.changed += 1
            rec = Record(fields, rec.source, rec.line)
        kept.append(rec)
    stats.rows_kept = len(kept)
    if records and not kept:
        raise DataError(records[0].source, None, None,
                        f"all {len(records)} rows were filtered out ({stats.summary()})")
    return kept, stats


def filter_by_tokens(records: list[Record], lengths: list[int], max_tokens: int) -> tuple[list[Record], int]:
    """Keep the records whose token count ``lengths[i]`` is at most ``max_tokens``; return (kept, dropped).

    Raises ``DataError`` when no record fits, naming the longest-allowed and the shortest found length.
    """
    if len(lengths) != len(records):
        raise ValueError(f"{len(records)} records but {len(lengths)} lengths")
    kept = [rec for rec, n in zip(records, lengths) if n <= max_tokens]
    if records and not kept:
        raise DataError(records[0].source, None, None,
                        f"all {len(records)} rows were filtered out (too_many_tokens={len(records)}: "
                        f"max_tokens={max_tokens}, shortest row has {min(lengths)} tokens)")
    return kept, len(records) - len(kept)


def _clean_value(rec: Record, name: str, normalize: str | None) -> str | list[str]:
    if name not in rec.fields:
        raise DataError(rec.source, rec.line, name, "missing text field")
    value = rec.fields[name]
    if value is None:
        return ""
    if isinstance(value, str):
        return clean_text(value, normalize)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [unicodedata.normalize(normalize, v) if normalize else v for v in value]
    raise DataError(rec.source, rec.line, name, f"expected text, found {type(value).__name__}")


def _drop_reason(lengths: list[int], min_chars: int, max_chars: int | None) -> str | None:
    if any(n == 0 for n in lengths):
        return "empty"
    if any(n < min_chars for n in lengths):
        return "too_short"
    if max_chars is not None and any(n > max_chars for n in lengths):
        return "too_long"
    return None
