"""Named-entity metrics: spans from tags, a tolerant parser for model outputs, and entity P/R/F1.

Two ways of scoring NER:
* tag sequences -> spans ``(type, start, end)`` with CoNLL exact-match semantics (conlleval, the
  default mode of seqeval) -> ``span_prf``;
* generated text like ``"PER: Ada Lovelace; LOC: London"`` -> ``parse_entities`` -> (type, text)
  pairs -> ``entity_prf`` / ``sentence_entity_f1``, matching by (type, normalized text) as a multiset
  per sentence (position is unknown in generated text).

This module is a leaf (no ppolm imports) so the NER reward can reuse it.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence

Span = tuple[str, int, int]
Entity = tuple[str, str]

# --------------------------------------------------------------------------------------------------
# Tags -> spans
# --------------------------------------------------------------------------------------------------

_SCHEME_PREFIXES = {"IOB1": "IB", "IOB2": "IB", "IOBES": "IBES"}


def _split_tag(tag: str, scheme: str, position: int) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, sep, etype = tag.partition("-")
    if not sep or prefix not in _SCHEME_PREFIXES[scheme] or not etype:
        raise ValueError(f"tag {tag!r} at position {position} is not valid for scheme {scheme}")
    return prefix, etype


def tags_to_spans(tags: Sequence[str], scheme: str = "IOB2") -> set[Span]:
    """Entity spans ``(type, start, end_exclusive)`` from a tag sequence, CoNLL (conlleval) rules.

    A chunk ends before token i when the previous tag is inside a chunk and token i is ``O``, a
    ``B-``/``S-``, follows an ``E-``/``S-``, or has a different type; a chunk starts at token i when it
    is ``B-``/``S-``, follows ``O``/``E-``/``S-``, or changes type. Hence ``I-X`` after ``O`` starts an
    entity (as in conlleval and seqeval's default mode), and in IOB1 ``B-X`` only separates two
    adjacent entities of the same type -- the same rules decode IOB1, IOB2 and IOBES. ``scheme`` only
    decides which prefixes are accepted; anything else raises ``ValueError``.
    """
    if scheme not in _SCHEME_PREFIXES:
        raise ValueError(f"scheme must be one of {sorted(_SCHEME_PREFIXES)}, got {scheme!r}")
    spans: set[Span] = set()
    prev_prefix, prev_type, start = "O", "", -1
    for i, tag in enumerate(list(tags) + ["O"]):  # the sentinel O closes a chunk at the end
        prefix, etype = _split_tag(tag, scheme, i)
        ends = prev_prefix != "O" and (
            prefix in ("O", "B", "S") or prev_prefix in ("E", "S") or etype != prev_type
        )
        if ends:
            spans.add((prev_type, start, i))
        starts = prefix != "O" and (
            prefix in ("B", "S") or prev_prefix in ("O", "E", "S") or etype != prev_type
        )
        if starts:
            start = i
        prev_prefix, prev_type = prefix, etype
    return spans


def spans_to_text(tokens: Sequence[str], spans: set[Span] | Sequence[Span]) -> list[Entity]:
    """``(type, " ".join(tokens[start:end]))`` for each span, ordered by position."""
    return [(t, " ".join(tokens[s:e])) for t, s, e in sorted(spans, key=lambda x: (x[1], x[2], x[0]))]


def tags_to_entities(tokens: Sequence[str], tags: Sequence[str], scheme: str = "IOB2") -> list[Entity]:
    """Gold (type, text) pairs of a tagged sentence: ``spans_to_text(tokens, tags_to_spans(tags))``."""
    if len(tokens) != len(tags):
        raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags")
    return spans_to_text(tokens, tags_to_spans(tags, scheme))


# --------------------------------------------------------------------------------------------------
# Tolerant parser for generated entity lists
# --------------------------------------------------------------------------------------------------

# Keys are normalized type names (lowercase, words joined by "-"); values are the canonical types.
CONLL_TYPE_MAP: dict[str, str] = {
    "per": "PER", "person": "PER", "persons": "PER", "people": "PER",
    "loc": "LOC", "location": "LOC", "locations": "LOC", "place": "LOC", "places": "LOC",
    "org": "ORG", "orgs": "ORG", "organization": "ORG", "organizations": "ORG",
    "organisation": "ORG", "organisations": "ORG",
    "misc": "MISC", "miscellaneous": "MISC", "other": "MISC",
}
WNUT17_TYPE_MAP: dict[str, str] = {
    "person": "person", "per": "person", "people": "person",
    "location": "location", "loc": "location", "place": "location",
    "corporation": "corporation", "corp": "corporation", "company": "corporation",
    "product": "product", "prod": "product",
    "creative-work": "creative-work", "creative": "creative-work", "work": "creative-work",
    "group": "group", "grp": "group",
}

_NONE_WORDS = {
    "", "none", "no entities", "no entity", "no named entities", "no entities found", "nothing",
    "n/a", "na", "nil", "null", "-", "[]", "{}", "empty",
}
_QUOTES = "\"'`\u2018\u2019\u201c\u201d\u00ab\u00bb"
_STRIP_CHARS = _QUOTES + " \t.,;:!?()[]{}*"
_BULLET = re.compile(r"^\s*(?:[-*\u2022\u2013>]+|\(?\d{1,3}[.)])\s*")


def _type_key(name: str) -> str:
    return re.sub(r"[\s_-]+", "-", name.strip().lower())


@functools.lru_cache(maxsize=16)
def _marker_regex(keys: tuple[str, ...]) -> re.Pattern[str]:
    # A marker is a known type name (any case, "creative work" == "creative_work") or an all-caps tag
    # such as DATE, optionally quoted, followed by ":"; all-caps unknown tags are markers too so
    # their entities end the previous entity instead of being glued onto it, and are then dropped.
    known = "|".join(
        r"[\s_-]+".join(re.escape(w) for w in k.split("-")) for k in sorted(keys, key=len, reverse=True)
    )
    return re.compile(
        rf"(?<![\w-])[\"'`]?((?i:{known})|[A-Z][A-Z0-9_-]{{1,24}})[\"'`]?\s*:(?!//)"
    )


def _clean_text(item: str) -> str:
    item = _BULLET.sub("", item)
    return " ".join(item.strip(_STRIP_CHARS).split())


def parse_entities(output: str, type_map: Mapping[str, str] | None = None) -> list[Entity]:
    """(type, text) pairs from a generated answer such as ``"PER: Ada Lovelace; LOC: London"``.

    Tolerates ``;``/newline/``|``/``,`` separators, bullets and numbering, type names in any case or
    long form (mapped through ``type_map``, default ``CONLL_TYPE_MAP``; see ``WNUT17_TYPE_MAP``),
    quotes and trailing periods around text, ``TYPE: a, b`` meaning two entities, and "none" / "no
    entities" / empty meaning no entities. Text before the first type marker, entities of unknown
    types and unparseable garbage are dropped; it never raises on a string. Duplicates are kept
    (scoring is by multiset). Note the price of tolerance: "LOC: Paris, France" gives two entities.
    """
    if not isinstance(output, str):
        return []
    tmap = {_type_key(k): v for k, v in (CONLL_TYPE_MAP if type_map is None else type_map).items()}
    if not tmap:
        return []
    text = output.replace("```", "\n").replace("\r", "\n")
    markers = list(_marker_regex(tuple(tmap)).finditer(text))
    entities: list[Entity] = []
    for k, m in enumerate(markers):
        etype = tmap.get(_type_key(m.group(1)))
        if etype is None:
            continue  # an unknown type (e.g. DATE): its text is skipped, not glued to a neighbour
        end = markers[k + 1].start() if k + 1 < len(markers) else len(text)
        for item in re.split(r"[,;|\n]", text[m.end() : end]):
            cleaned = _clean_text(item)
            if cleaned.lower() not in _NONE_WORDS:
                entities.append((etype, cleaned))
    return entities


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def normalize_entity_text(text: str) -> str:
    """Matching key of an entity text: NFKC, lowercase, outer quotes/punctuation off, single spaces."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    return " ".join(text.strip(_STRIP_CHARS).split())


def _prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float | int]:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "n_pred": n_pred,
            "support": n_gold}


def _aggregate(sentences: list[tuple[Counter, Counter]]) -> dict:
    """Micro P/R/F1 and per type from per-sentence (gold, pred) multisets of ``(type, key...)``."""
    tp, n_pred, n_gold = Counter(), Counter(), Counter()
    for gold, pred in sentences:
        for item, count in gold.items():
            n_gold[item[0]] += count
            tp[item[0]] += min(count, pred.get(item, 0))
        for item, count in pred.items():
            n_pred[item[0]] += count
    types = sorted(set(n_gold) | set(n_pred))
    per_type = {t: _prf(tp[t], n_pred[t], n_gold[t]) for t in types}
    result: dict = _prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    result["f1_macro"] = sum(p["f1"] for p in per_type.values()) / len(types) if types else 0.0
    result["per_type"] = per_type
    return result


def entity_prf(gold: Sequence[Sequence[Entity]], pred: Sequence[Sequence[Entity]]) -> dict:
    """Micro P/R/F1 over sentences of (type, text) entities, plus macro F1 and per type.

    Per sentence, gold and predicted entities are multisets of ``(type, normalize_entity_text(text))``;
    TP = sum of min(gold count, pred count). P = TP / #pred, R = TP / #gold, F1 = 2PR / (P + R), pooled
    over sentences (micro); 0/0 = 0. ``per_type[t]`` has precision, recall, f1, tp, n_pred, support.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    def keys(entities: Sequence[Entity]) -> Counter:
        return Counter((etype, normalize_entity_text(text)) for etype, text in entities)

    return _aggregate([(keys(g), keys(p)) for g, p in zip(gold, pred)])


def sentence_entity_f1(gold: Sequence[Entity], pred: Sequence[Entity]) -> float:
    """Entity F1 of one sentence (as in ``entity_prf``); 1.0 when both are empty."""
    if not gold and not pred:
        return 1.0
    return float(entity_prf([gold], [pred])["f1"])


def span_prf(gold_spans: Sequence[set[Span]], pred_spans: Sequence[set[Span]]) -> dict:
    """Micro P/R/F1, macro F1 and per type of exact span matches ``(type, start, end)`` per sentence.

    With spans from ``tags_to_spans`` this equals seqeval's default-mode (conlleval) scores.
    """
    if len(gold_spans) != len(pred_spans):
        raise ValueError(f"gold has {len(gold_spans)} sentences but pred has {len(pred_spans)}")
    return _aggregate([(Counter(set(g)), Counter(set(p))) for g, p in zip(gold_spans, pred_spans)])
