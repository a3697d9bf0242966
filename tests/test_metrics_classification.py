"""Classification and generation metrics: hand-computed cases and agreement with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score, roc_curve

from ppolm.eval.metrics import (
    classification_metrics,
    distinct_n,
    generation_metrics,
    label_from_completion,
    labels_in_completion,
)

LABELS = ["negative", "positive"]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Sentiment: Positive.", "positive"),
        ("NEGATIVE", "negative"),
        ("It is negative, not positive", "negative"),
        ("positively great", None),  # not a whole word
        ("", None),
        ("I cannot tell", None),
    ],
)
def test_label_from_completion(completion: str, expected: str | None) -> None:
    assert label_from_completion(completion, LABELS) == expected


def test_label_longest_match_and_order() -> None:
    labels = ["positive", "very positive", "n/a"]
    assert label_from_completion("Very positive!", labels) == "very positive"
    assert labels_in_completion("n/a or positive", labels) == ["n/a", "positive"]


def test_hand_computed_with_invalid_prediction() -> None:
    labels = ["a", "b", "c"]
    y_true = ["a", "a", "b", "b", "c", "c"]
    y_pred = ["a", "b", "b", "unparseable", "c", "a"]
    m = classification_metrics(y_true, y_pred, labels)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["invalid_rate"] == pytest.approx(1 / 6)
    # per class: a P=1/2 R=1/2; b P=1/2 R=1/2 (the invalid one is a FN of b); c P=1 R=1/2
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["c"]["precision"] == pytest.approx(1.0)
    assert m["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert m["precision_macro"] == pytest.approx(2 / 3)
    assert m["recall_macro"] == pytest.approx(0.5)
    assert m["f1_macro"] == pytest.approx(5 / 9)
    # micro: TP=3, FP=2 (invalid is nobody's FP), FN=3
    assert m["precision_micro"] == pytest.approx(3 / 5)
    assert m["recall_micro"] == pytest.approx(1 / 2)
    assert m["f1_micro"] == pytest.approx(6 / 11)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert m["invalid_per_class"] == {"a": 0, "b": 1, "c": 0}
    assert m["roc_auc"] is None and m["roc_curves"] is None


def test_none_prediction_counts_as_wrong() -> None:
    m = classification_metrics(["a", "b"], [None, "b"], ["a", "b"])
    assert m["accuracy"] == 0.5 and m["invalid_rate"] == 0.5


def test_agrees_with_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(0)
    labels = ["x", "y", "z", "w"]
    y_true = list(rng.choice(labels, 60))
    y_pred = list(rng.choice(labels, 60))
    m = classification_metrics(y_true, y_pred, labels)
    for avg in ("macro", "micro"):
        assert m[f"f1_{avg}"] == pytest.approx(f1_score(y_true, y_pred, labels=labels, average=avg))
        assert m[f"precision_{avg}"] == pytest.approx(precision_score(y_true, y_pred, labels=labels, average=avg))
        assert m[f"recall_{avg}"] == pytest.approx(recall_score(y_true, y_pred, labels=labels, average=avg))
    assert m["accuracy"] == pytest.approx(np.mean(np.array(y_true) == np.array(y_pred)))
    assert sum(map(sum, m["confusion_matrix"])) == 60


def test_binary_auc_hand_computed() -> None:
    # positives score 0.9, 0.4; negatives 0.5, 0.1 -> 3 of 4 (pos, neg) pairs ordered -> AUC 0.75
    y_true = ["positive", "positive", "negative", "negative"]
    p_pos = [0.9, 0.4, 0.5, 0.1]
    scores = [[1 - s, s] for s in p_pos]
    m = classification_metrics(y_true, ["positive"] * 4, LABELS, scores)
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["roc_auc_per_class"]["negative"] == pytest.approx(0.75)
    fpr, tpr, _ = roc_curve([1, 1, 0, 0], p_pos)
    assert m["roc_curves"]["positive"] == {"fpr": pytest.approx(fpr.tolist()), "tpr": pytest.approx(tpr.tolist())}


def test_multiclass_auc_matches_sklearn_ovr_macro() -> None:
    rng = np.random.default_rng(1)
    labels = ["a", "b", "c"]
    y_true = [labels[i] for i in rng.integers(0, 3, 40)]
    logits = rng.normal(size=(40, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y_true, y_true, labels, probs.tolist())
    expected = roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels)
    assert m["roc_auc"] == pytest.approx(expected)
    assert m["per_class"]["b"]["auc"] == pytest.approx(roc_auc_score(np.array(y_true) == "b", probs[:, 1]))


def test_auc_undefined_is_none() -> None:
    m = classification_metrics(["positive"] * 3, ["positive"] * 3, LABELS, [[0.2, 0.8]] * 3)
    assert m["roc_auc"] is None
    assert m["roc_curves"] == {"negative": None, "positive": None}
    # one class of three absent: the macro AUC averages the classes where it is defined
    m3 = classification_metrics(["a", "b"], ["a", "b"], ["a", "b", "c"], [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]])
    assert m3["roc_auc_per_class"]["c"] is None and m3["roc_auc"] == pytest.approx(1.0)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="not in labels"):
        classification_metrics(["q"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(["a"], ["a"], ["a", "b"], [[1.0]])
    empty = classification_metrics([], [], ["a", "b"])
    assert empty["accuracy"] is None and empty["n"] == 0


def test_distinct_n_hand_computed() -> None:
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran over 6 tokens
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert distinct_n(["a", "b"], 2) == 0.0  # no bigram inside a text; none across texts
    assert distinct_n(["x y"] * 5, 2) == pytest.approx(1 / 5)


def test_generation_metrics() -> None:
    m = generation_metrics(["a b", "a b c d"], rewards=[1.0, 0.0], kls=[0.5, 0.25])
    assert m == {
        "n": 2, "reward_mean": 0.5, "kl_mean": 0.375, "distinct_1": pytest.approx(4 / 6),
        "distinct_2": pytest.approx(3 / 4), "length_mean_words": 3.0,
    }
    assert generation_metrics(["a"])["reward_mean"] is None
