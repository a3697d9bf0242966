"""The uncertainty of a held-out metric, and the comparisons that must exceed it.

A held-out check on n rows measures its metric with sampling noise: accuracy on 64 rows has a standard error
of ~0.06, so a drop of 0.1 between two checks is under two standard errors. Every decision ppolm takes on
held-out numbers (the guard's ``max_drop``, which model a pipeline exports, whether a stage missed its bar)
goes through :func:`clearly_below` here, so none acts on a difference smaller than its noise.

* accuracy (a mean of 0/1 outcomes): the binomial standard error (Agresti-Coull: not 0 at p = 0 or 1);
* any other metric (F1, chrF, BLEU, reward mean ...): the bootstrap standard error, the standard deviation of
  the metric over ``n_boot`` resamples of the rows with replacement (Efron & Tibshirani 1993, ch. 6), with a
  fixed seed so that a check is reproducible.

Two checks are compared as independent measurements: se(a - b) = sqrt(se_a^2 + se_b^2). That is
conservative for checks on the same rows (their errors are positively correlated, so the paired error is
smaller), i.e. it errs towards not acting.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

LOWER_IS_BETTER = frozenset({"ter", "loss", "perplexity", "invalid_rate", "kl_mean"})
"""Metrics where a smaller value is better; every other metric is higher-is-better (the one place this lives)."""

Z_95 = 1.959964
"""Two-sided 95% normal quantile: a printed interval is value +- Z_95 x se."""


def higher_is_better(metric: str) -> bool:
    """The direction of a task metric by name."""
    return metric not in LOWER_IS_BETTER


def binomial_se(p: float, n: int) -> float:
    """Standard error of a proportion p measured on n rows, Agresti-Coull's: with p~ = (p n + 2) / (n + 4),
    sqrt(p~ (1 - p~) / (n + 4)). Unlike the plain sqrt(p (1 - p) / n) it is not 0 at p = 0 or 1, where 8 rows
    that all agree are no certainty (Agresti & Coull 1998); for 200 rows at p = 0.7 the two differ by 1%."""
    if n <= 0:
        return 0.0
    pt = (p * n + 2.0) / (n + 4.0)
    return math.sqrt(pt * (1.0 - pt) / (n + 4.0))


def mean_se(values: Sequence[float]) -> float | None:
    """Standard error of a mean of per-row values: sample std / sqrt(n) (None for n < 2)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def bootstrap_se(metric: Callable[[list[int]], float | None], n: int, n_boot: int = 100, seed: int = 0) -> float | None:
    """Bootstrap standard error of a metric of n rows. ``metric(indices)`` computes it on the rows at
    ``indices`` (a resample with replacement, length n); resamples where it is undefined (None) are skipped.
    None when fewer than 2 resamples give a value."""
    if n < 2:
        return None
    rng = random.Random(seed)
    values = []
    for _ in range(n_boot):
        v = metric([rng.randrange(n) for _ in range(n)])
        if isinstance(v, (int, float)) and math.isfinite(v):
            values.append(float(v))
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def resample_task_metric(task: Any, examples: Sequence, completions: Sequence[str], metric: str,
                         extra: dict[str, Any] | None = None) -> Callable[[list[int]], float | None]:
    """``indices -> task.metrics(...)[metric]`` on those rows, for :func:`bootstrap_se`. Per-row lists in
    ``extra`` (label probabilities, KLs, rewards: any list of length n) are resampled with the rows."""
    n = len(examples)
    extra = extra or {}

    def at(indices: list[int]) -> float | None:
        picked = {k: ([v[i] for i in indices] if isinstance(v, list) and len(v) == n else v) for k, v in extra.items()}
        value = task.metrics([examples[i] for i in indices], [completions[i] for i in indices], **picked).get(metric)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return at


def metric_se(task: Any, examples: Sequence, completions: Sequence[str], metric: str, value: float,
              extra: dict[str, Any] | None = None, seed: int = 0) -> float | None:
    """Standard error of ``task.metrics(examples, completions)[metric] == value``: binomial for accuracy,
    bootstrap otherwise."""
    if metric == "accuracy":
        return binomial_se(value, len(examples))
    return bootstrap_se(resample_task_metric(task, examples, completions, metric, extra), len(examples), seed=seed)


def diff_se(se_a: float | None, se_b: float | None) -> float:
    """se of a - b for independent measurements (a missing se counts as 0)."""
    return math.hypot(se_a or 0.0, se_b or 0.0)


def clearly_below(value: float, se: float | None, reference: float, reference_se: float | None, *,
                  higher: bool = True, margin: float = 0.0, z: float = 2.0) -> bool:
    """True when ``value`` is worse than ``reference`` by more than ``margin`` and by more than ``z`` standard
    errors of the difference (in the metric's direction). z = 0 makes it the plain comparison."""
    gap = (reference - value) if higher else (value - reference)
    return gap > margin and gap > z * diff_se(se, reference_se)


def interval(value: float | None, se: float | None) -> str:
    """'0.8730 ± 0.0533' (a 95% normal interval), or the value alone without an se."""
    if not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4f}" if se is None else f"{value:.4f} ± {Z_95 * se:.4f}"
