"""MT metrics: hand-computed BLEU/TER and agreement with sacrebleu's own entry points."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from ppolm.eval.mt_metrics import bleu_tokenize_for, mt_metrics, sentence_bleu, sentence_chrf

HYPS = ["the cat sat on the mat", "a quick brown fox jumps", "hello world"]
REFS = ["the cat sat on a mat", "the quick brown fox jumped", "hello there world"]


def test_bleu_hand_computed() -> None:
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3 and equal lengths (BP = 1)
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    m = mt_metrics([HYPS[0]], [REFS[0]])
    assert m["bleu"] == pytest.approx(expected)
    assert m["bleu_brevity_penalty"] == pytest.approx(1.0)
    assert m["ter"] == pytest.approx(100 / 6)  # one substitution over 6 reference words


def test_identical_and_brevity_penalty() -> None:
    m = mt_metrics(REFS, REFS)
    assert m["bleu"] == pytest.approx(100) and m["chrf"] == pytest.approx(100) and m["ter"] == 0
    short = mt_metrics(["the cat sat on"], ["the cat sat on a mat"])
    assert short["bleu_brevity_penalty"] == pytest.approx(math.exp(1 - 6 / 4))


def test_corpus_scores_agree_with_sacrebleu() -> None:
    m = mt_metrics(HYPS, REFS)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert m["ter"] == pytest.approx(sacrebleu.corpus_ter(HYPS, [REFS]).score)
    assert m["bleu_tokenize"] == "13a" and m["n"] == 3


def test_chinese_tokenization() -> None:
    hyps, refs = ["我喜欢吃苹果"], ["我很喜欢吃苹果"]
    assert bleu_tokenize_for("zh-CN") == "zh" and bleu_tokenize_for("de") == "13a"
    zh = mt_metrics(hyps, refs, target_lang="zh")
    assert zh["bleu_tokenize"] == "zh"
    assert zh["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score)
    assert zh["bleu"] > 0  # with 13a each sentence is one "word" and BLEU is 0
    assert mt_metrics(hyps, refs)["bleu"] == 0.0
    assert mt_metrics(hyps, refs, tokenize="char")["bleu_tokenize"] == "char"


def test_sentence_scores() -> None:
    for h, r in zip(HYPS, REFS):
        assert sentence_bleu(h, r) == pytest.approx(sacrebleu.sentence_bleu(h, [r]).score)
        assert sentence_chrf(h, r) == pytest.approx(sacrebleu.sentence_chrf(h, [r]).score)
    assert sentence_bleu("hello world", "hello world") == 100.0  # clipped, not 100.00000000000004
    assert sentence_chrf("", "hello") == 0.0 and sentence_bleu("", "hello") == 0.0
    assert 0 < sentence_chrf("hello wrld", "hello world") < 100


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        mt_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        mt_metrics([], [])
