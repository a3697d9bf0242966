"""NER: tag decoding vs seqeval/conlleval, the tolerant output parser, and entity P/R/F1."""

from __future__ import annotations

import random

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities

from ppolm.eval.ner_metrics import (
    WNUT17_TYPE_MAP,
    entity_prf,
    parse_entities,
    sentence_entity_f1,
    span_prf,
    spans_to_text,
    tags_to_entities,
    tags_to_spans,
)


def test_iob2_hand_computed() -> None:
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG", "I-ORG", "O", "I-MISC"]
    assert tags_to_spans(tags) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 7), ("MISC", 8, 9)}


def test_iob1_b_only_separates_same_type() -> None:
    tags = ["I-PER", "I-PER", "B-PER", "I-LOC", "O", "I-ORG"]
    assert tags_to_spans(tags, "IOB1") == {("PER", 0, 2), ("PER", 2, 3), ("LOC", 3, 4), ("ORG", 5, 6)}


def test_iobes_and_bad_tags() -> None:
    assert tags_to_spans(["S-PER", "B-LOC", "E-LOC"], "IOBES") == {("PER", 0, 1), ("LOC", 1, 3)}
    with pytest.raises(ValueError, match="position 1"):
        tags_to_spans(["O", "E-PER"], "IOB2")
    with pytest.raises(ValueError):
        tags_to_spans(["PER"])
    assert tags_to_spans([]) == set()


def _random_tags(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-creative-work"]) for _ in range(n)]


def test_spans_agree_with_seqeval_on_random_sequences() -> None:
    rng = random.Random(0)
    for _ in range(300):
        tags = _random_tags(rng, rng.randint(0, 12))
        expected = {(t, s, e + 1) for t, s, e in get_entities(tags)}  # seqeval's end is inclusive
        assert tags_to_spans(tags) == expected, tags


def test_span_prf_agrees_with_seqeval() -> None:
    rng = random.Random(1)
    gold = [_random_tags(rng, rng.randint(1, 10)) for _ in range(40)]
    pred = [[t if rng.random() < 0.7 else rng.choice(["O", "B-PER", "I-LOC"]) for t in g] for g in gold]
    m = span_prf([tags_to_spans(g) for g in gold], [tags_to_spans(p) for p in pred])
    assert m["precision"] == pytest.approx(precision_score(gold, pred))
    assert m["recall"] == pytest.approx(recall_score(gold, pred))
    assert m["f1"] == pytest.approx(f1_score(gold, pred))
    report = classification_report(gold, pred, output_dict=True)
    assert m["f1_macro"] == pytest.approx(report["macro avg"]["f1-score"])
    for etype, row in m["per_type"].items():
        if row["support"]:
            assert row["f1"] == pytest.approx(report[etype]["f1-score"])
            assert row["support"] == report[etype]["support"]


def test_spans_to_text() -> None:
    tokens = ["Ada", "Lovelace", "visited", "London"]
    tags = ["B-PER", "I-PER", "O", "B-LOC"]
    assert spans_to_text(tokens, tags_to_spans(tags)) == [("PER", "Ada Lovelace"), ("LOC", "London")]
    assert tags_to_entities(tokens, tags) == [("PER", "Ada Lovelace"), ("LOC", "London")]


@pytest.mark.parametrize(
    "output, expected",
    [
        ("PER: Ada Lovelace; LOC: London", [("PER", "Ada Lovelace"), ("LOC", "London")]),
        ("PER: Ada Lovelace\nLOC: London", [("PER", "Ada Lovelace"), ("LOC", "London")]),
        ("PER: Ada, LOC: London | ORG: IBM", [("PER", "Ada"), ("LOC", "London"), ("ORG", "IBM")]),
        ("1. PER: Ada\n2) LOC: London.", [("PER", "Ada"), ("LOC", "London")]),
        ("- person: \"Ada\"\n* location: 'London'", [("PER", "Ada"), ("LOC", "London")]),
        ("Organization: United Nations. Misc: English", [("ORG", "United Nations"), ("MISC", "English")]),
        ("org: IBM; ORGANISATION: BBC", [("ORG", "IBM"), ("ORG", "BBC")]),
        ("PER: Ada, Bob", [("PER", "Ada"), ("PER", "Bob")]),
        ("PER: Ada; PER: Ada", [("PER", "Ada"), ("PER", "Ada")]),
        ("Here are the entities:\nPER: Ada", [("PER", "Ada")]),
        ("PER: Ada DATE: Monday LOC: Paris", [("PER", "Ada"), ("LOC", "Paris")]),
        ('{"PER": ["Ada"], "LOC": ["London"]}', [("PER", "Ada"), ("LOC", "London")]),
        ("PER: none; LOC: London", [("LOC", "London")]),
        ("none", []),
        ("No entities.", []),
        ("", []),
        ("   \n ", []),
        ("asdkj qwe ::: ;; || ,,", []),
        ("The weather is nice today.", []),
        ("PER:", []),
    ],
)
def test_parse_entities(output: str, expected: list[tuple[str, str]]) -> None:
    assert parse_entities(output) == expected


def test_parse_entities_wnut_map_and_non_strings() -> None:
    out = "creative work: Star Wars; Corporation: Apple\nPerson: Bob, product: iPhone; group: Blur"
    assert parse_entities(out, WNUT17_TYPE_MAP) == [
        ("creative-work", "Star Wars"), ("corporation", "Apple"), ("person", "Bob"),
        ("product", "iPhone"), ("group", "Blur"),
    ]
    assert parse_entities(None) == []  # type: ignore[arg-type]
    assert parse_entities("PER: Ada", {"persona": "P"}) == []  # PER is not a type of this map


def test_entity_prf_hand_computed() -> None:
    gold = [[("PER", "Ada Lovelace"), ("LOC", "London")], [("ORG", "IBM"), ("ORG", "IBM")]]
    pred = [[("PER", "ada lovelace."), ("LOC", "Paris")], [("ORG", "IBM"), ("PER", "Bob")]]
    m = entity_prf(gold, pred)
    # TP = 2 (Ada after normalization, one IBM: multiset), #pred = 4, #gold = 4
    assert (m["tp"], m["n_pred"], m["support"]) == (2, 4, 4)
    assert m["precision"] == m["recall"] == m["f1"] == pytest.approx(0.5)
    assert m["per_type"]["ORG"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "tp": 1,
                                    "n_pred": 1, "support": 2}
    assert m["per_type"]["LOC"]["f1"] == 0.0
    with pytest.raises(ValueError):
        entity_prf([[]], [])


def test_sentence_entity_f1() -> None:
    assert sentence_entity_f1([], []) == 1.0
    assert sentence_entity_f1([("PER", "Ada")], []) == 0.0
    assert sentence_entity_f1([], [("PER", "Ada")]) == 0.0
    # P = 1/2, R = 1 -> F1 = 2/3
    assert sentence_entity_f1([("PER", "Ada")], [("PER", "Ada"), ("LOC", "Ada")]) == pytest.approx(2 / 3)
    assert sentence_entity_f1([("PER", "Ada")], [("LOC", "Ada")]) == 0.0  # type must match


def test_parser_and_f1_round_trip() -> None:
    tokens = "Ada Lovelace met Charles Babbage in London".split()
    tags = ["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "B-LOC"]
    gold = tags_to_entities(tokens, tags)
    answer = "1. person: Charles Babbage, Ada Lovelace\n2. location: London."
    assert sentence_entity_f1(gold, parse_entities(answer)) == 1.0
