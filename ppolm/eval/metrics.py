"""Classification and generation metrics.

Classification metrics come from scikit-learn (accuracy, P/R/F1, confusion matrix, ROC-AUC, ROC curves);
this module only adds what scikit-learn lacks for language-model outputs: reading a label word out of
free text (``label_from_completion``), predictions that are not a valid label (``invalid_rate``), and
AUCs that are undefined (``None`` instead of an exception).

Generation metrics: distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
Conversation Models") and simple means of rewards, KLs and lengths. Perplexity is computed elsewhere
because it needs the model.

This module is a leaf (no ppolm imports) so reward functions can reuse ``label_from_completion``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

# scikit-learn is imported where a metric is computed, not here: reward functions import this module for
# `label_from_completion`, and sklearn (with scipy and pandas) would add ~0.12 GB to every training process.

# --------------------------------------------------------------------------------------------------
# Reading a label out of a completion
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _label_regex(labels: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first so that "very positive" wins over "positive" at the same position; lookarounds
    # instead of \b so labels that start or end with punctuation ("n/a", "4+") still work.
    alternation = "|".join(re.escape(lab) for lab in sorted(set(labels), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)


def labels_in_completion(completion: str, labels: Sequence[str]) -> list[str]:
    """All label words found in ``completion``, in order of appearance (case-insensitive, whole words).

    Each hit is returned with the spelling used in ``labels``; labels that differ only by case are
    indistinguishable here and resolve to the first one listed.
    """
    labels = [lab for lab in labels if lab.strip()]
    if not labels or not completion:
        return []
    canonical: dict[str, str] = {}
    for lab in labels:
        canonical.setdefault(lab.lower(), lab)
    return [canonical[m.group(0).lower()] for m in _label_regex(tuple(labels)).finditer(completion)]


def label_from_completion(completion: str, labels: Sequence[str]) -> str | None:
    """The first label word in ``completion`` (case-insensitive, word boundaries), or ``None``.

    ``"Sentiment: Positive."`` with labels ``["negative", "positive"]`` gives ``"positive"``;
    ``"positively"`` gives ``None`` (not a whole word).
    """
    found = labels_in_completion(completion, labels)
    return found[0] if found else None


def label_set(labels_all: Sequence[Any] | None) -> list[str] | None:
    """The label words once, in order: a batch's ``labels_all`` row field holds one label list per row
    (``[["negative", "positive"], ...]``); a flat list is returned as it is, None stays None."""
    if labels_all and isinstance(labels_all[0], (list, tuple)):
        return list(dict.fromkeys(w for row in labels_all for w in row))
    return None if labels_all is None else list(labels_all)


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------


def _safe_auc(y_binary: np.ndarray, score: np.ndarray) -> float | None:
    """ROC-AUC of one binary problem; ``None`` when only one class is present (AUC undefined)."""
    if y_binary.min() == y_binary.max():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y_binary, score))


def _roc_points(y_binary: np.ndarray, score: np.ndarray) -> dict[str, list[float]] | None:
    if y_binary.min() == y_binary.max():
        return None
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y_binary, score)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def classification_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    labels: Sequence[str],
    scores: Sequence[Sequence[float]] | None = None,
) -> dict:
    """Accuracy, P/R/F1 (macro, micro, per class), confusion matrix and ROC-AUC.

    Args:
        y_true: (B,) gold labels; each must be one of ``labels``.
        y_pred: (B,) predicted labels; anything not in ``labels`` (``None``, ``"unparseable"``) is an
            invalid prediction and counts as wrong.
        labels: (C,) label order used for the confusion matrix, per-class results and ``scores``
            columns; for a binary task ``labels[1]`` is the positive class.
        scores: optional (B, C) scores (e.g. probabilities of the label words), column c for labels[c].

    Formulas (per class c, TP/FP/FN counted over valid labels only):
        precision_c = TP_c / (TP_c + FP_c), recall_c = TP_c / (TP_c + FN_c), F1_c = 2PR / (P + R)
        macro = mean over classes; micro pools TP/FP/FN over classes. An invalid prediction is a FN
        of its true class and a FP of no class, so with invalid predictions micro-F1 != accuracy.
        accuracy = mean(y_pred == y_true); invalid_rate = mean(y_pred not in labels);
        top_label_share = max_c mean(y_pred == c) (1.0 when every answer is the same label).
        ROC-AUC: binary -> AUC(y == labels[1], scores[:, 1]); C > 2 -> one-vs-rest macro, i.e. the
        mean of the per-class AUC(y == c, scores[:, c]) over classes where it is defined.
        Undefined values (no examples, single class present) are ``None``; 0/0 in P/R/F1 is 0.

    Returns:
        dict with keys ``n, labels, accuracy, invalid_rate, top_label_share, precision_macro, recall_macro, f1_macro,
        precision_micro, recall_micro, f1_micro, per_class`` ({label: {precision, recall, f1,
        support, auc}}), ``confusion_matrix`` (C x C list, rows = true, columns = predicted, invalid
        predictions left out), ``invalid_per_class`` ({true label: count}), ``roc_auc``,
        ``roc_auc_per_class`` and ``roc_curves`` ({label: {fpr, tpr} | None}); the three ROC keys are
        ``None`` without ``scores``.
    """
    labels = list(labels)
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"labels must be non-empty and unique, got {labels}")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({str(t) for t in y_true if t not in index})
    if unknown:
        raise ValueError(f"gold labels {unknown} are not in labels {labels}")
    n, n_classes = len(y_true), len(labels)
    # Integer codes: -1 marks an invalid prediction, which sklearn then ignores when restricted to
    # labels=range(C) (it is neither a TP nor a FP of any class, but stays a FN of the true class).
    t = np.array([index[y] for y in y_true], dtype=int)
    p = np.array([index.get(y, -1) if isinstance(y, str) else -1 for y in y_pred], dtype=int)
    class_ids = list(range(n_classes))

    result: dict = {"n": n, "labels": labels}
    if n == 0:
        zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "auc": None}
        result.update(accuracy=None, invalid_rate=None, precision_macro=0.0, recall_macro=0.0,
                      f1_macro=0.0, precision_micro=0.0, recall_micro=0.0, f1_micro=0.0,
                      per_class={lab: dict(zero) for lab in labels},
                      confusion_matrix=[[0] * n_classes for _ in labels],
                      invalid_per_class={lab: 0 for lab in labels},
                      roc_auc=None, roc_auc_per_class=None, roc_curves=None)
        return result

    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    result["accuracy"] = float(accuracy_score(t, p))
    result["invalid_rate"] = float(np.mean(p < 0))
    # The "answers one label to everything" check: share of all predictions taken by the most frequent label.
    result["top_label_share"] = float(np.bincount(p[p >= 0], minlength=n_classes).max() / n) if n else None
    for avg in ("macro", "micro"):
        prec, rec, f1, _ = precision_recall_fscore_support(
            t, p, labels=class_ids, average=avg, zero_division=0
        )
        result[f"precision_{avg}"], result[f"recall_{avg}"] = float(prec), float(rec)
        result[f"f1_{avg}"] = float(f1)
    prec_c, rec_c, f1_c, sup_c = precision_recall_fscore_support(
        t, p, labels=class_ids, average=None, zero_division=0
    )
    per_class = {
        lab: {"precision": float(prec_c[i]), "recall": float(rec_c[i]), "f1": float(f1_c[i]),
              "support": int(sup_c[i]), "auc": None}
        for i, lab in enumerate(labels)
    }
    result["confusion_matrix"] = confusion_matrix(t, p, labels=class_ids).tolist()
    result["invalid_per_class"] = {lab: int(np.sum((t == i) & (p < 0))) for i, lab in enumerate(labels)}

    result["roc_auc"] = result["roc_auc_per_class"] = result["roc_curves"] = None
    if scores is not None:
        s = np.asarray(scores, dtype=float)
        if s.shape != (n, n_classes):
            raise ValueError(f"scores must have shape (B, C) = ({n}, {n_classes}), got {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError("scores contain NaN or infinite values")
        aucs: dict[str, float | None] = {}
        curves: dict[str, dict[str, list[float]] | None] = {}
        for i, lab in enumerate(labels):
            y_bin = (t == i).astype(int)
            aucs[lab] = per_class[lab]["auc"] = _safe_auc(y_bin, s[:, i])
            curves[lab] = _roc_points(y_bin, s[:, i])
        if n_classes == 2:
            result["roc_auc"] = aucs[labels[1]]
        else:
            defined = [a for a in aucs.values() if a is not None]
            result["roc_auc"] = float(np.mean(defined)) if defined else None
        result["roc_auc_per_class"], result["roc_curves"] = aucs, curves
    result["per_class"] = per_class
    return result


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n over a set of texts: |unique n-grams| / |n-grams|, whitespace tokens.

    N-grams are taken inside each text (never across two texts) and pooled over the whole set, so
    repeating the same sentence lowers the score. Returns 0.0 when there are no n-grams at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def _mean(values: Sequence[float] | None) -> float | None:
    if values is None or len(values) == 0:
        return None
    return float(math.fsum(float(v) for v in values) / len(values))


def generation_metrics(
    texts: Sequence[str],
    rewards: Sequence[float] | None = None,
    kls: Sequence[float] | None = None,
) -> dict:
    """Summary of a set of generated texts.

    Args:
        texts: (B,) generated completions.
        rewards: optional (B,) scalar rewards per text.
        kls: optional (B,) per-sequence KL(policy || reference) estimates.

    Returns:
        ``reward_mean`` and ``kl_mean`` (``None`` when not given or empty), ``distinct_1``,
        ``distinct_2`` (see ``distinct_n``), ``length_mean_words`` = mean whitespace word count, and
        ``n``.
    """
    lengths = [len(t.split()) for t in texts]
    return {
        "n": len(texts),
        "reward_mean": _mean(rewards),
        "kl_mean": _mean(kls),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "length_mean_words": _mean(lengths) if lengths else None,
    }
