"""The RLHF flow's data builder (ppolm/data/sentiment_pairs.py) on the shipped CC BY sentences and small files."""

from pathlib import Path

import pytest

from ppolm.data.preferences import read_preferences
from ppolm.data.sentiment_pairs import (
    Sentence, build_rlhf_data, cut, make_pairs, make_prompts, read_labelled_sentences, split_sentences,
)
from ppolm.errors import DataError

SHIPPED = sorted(str(p) for p in (Path(__file__).parent.parent / "data/sentiment_sentences").glob("*_labelled.txt"))


def test_cut():
    assert cut("The food was really very good", 3, 2) == ("The food was", "really very good")
    assert cut("Too short here", 3, 1) is None


def test_pairs_prefer_the_positive_continuation_of_the_same_domain():
    sents = [Sentence("I loved this place so much", 1, "yelp"), Sentence("I hated the cold soup here", 0, "yelp"),
             Sentence("The phone broke after a week", 0, "amazon")]
    prompts = make_prompts(sents, "Continue: {text}", 2, 2)
    assert [p.prompt for p in prompts] == ["Continue: I loved", "Continue: I hated", "Continue: The phone"]
    pairs = make_pairs(prompts, seed=0)
    # amazon has no positive sentence: its prompt makes no pair; each yelp prompt pairs with the other one
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Continue: I loved", "this place so much", "the cold soup here"),
        ("Continue: I hated", "this place so much", "the cold soup here")]


def test_split_is_disjoint_and_seeded():
    sents = [Sentence(f"sentence number {i} is here", i % 2, "d") for i in range(20)]
    train, val, test = split_sentences(sents, 5, 3, seed=0)
    assert (len(train), len(val), len(test)) == (12, 3, 5)
    assert not {s.text for s in test} & {s.text for s in train + val}
    assert split_sentences(sents, 5, 3, seed=0) == (train, val, test)
    assert split_sentences(sents, 5, 3, seed=1)[2] != test
    with pytest.raises(ValueError):
        split_sentences(sents, 15, 5, seed=0)


def test_shipped_sentences_build_disjoint_real_pairs(tmp_path):
    data = build_rlhf_data(SHIPPED, instruction="Continue this review: {text}", prompt_words=4, min_rest_words=3,
                           n_test=300, n_val=200, seed=0)
    rests = {}
    for s in read_labelled_sentences(SHIPPED):
        parts = cut(s.text, 4, 3)
        if parts:
            rests.setdefault(parts[1], set()).add(s.label)
    # every chosen text is the rest of a real positive sentence, every rejected one of a real negative one
    assert all(1 in rests[p.chosen] and 0 in rests[p.rejected] for p in data.train_pairs + data.val_pairs)
    test_texts = {p.rest for p in data.test_prompts}
    assert not test_texts & {t for p in data.train_pairs + data.val_pairs for t in (p.chosen, p.rejected)}
    assert not {p.prompt for p in data.test_prompts} & {p.prompt for p in data.train_prompts}
    assert len(data.test_prompts) > 150 and len(data.train_pairs) > 1000
    paths = data.write(tmp_path)
    assert read_preferences(paths["train_pairs"])[0].chosen == data.train_pairs[0].chosen
    assert len(paths["test_prompts"].read_text().splitlines()) == len(data.test_prompts)


def test_bad_label_names_file_line_field(tmp_path):
    f = tmp_path / "x_labelled.txt"
    f.write_text("Good food here.\t1\nBad.\t7\n")
    with pytest.raises(DataError, match=r"x_labelled.txt:2: field 'label'"):
        read_labelled_sentences([f])
