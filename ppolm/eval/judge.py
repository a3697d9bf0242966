"""The independent sentiment judge of the RLHF flow: VADER (Hutto and Gilbert, ICWSM 2014), a public,
well-known lexicon-and-rules sentiment scorer (package `vaderSentiment`, MIT licence; its lexicon ships inside
the package, nothing is downloaded).

It only measures. It is never a reward: a reward model trained on preference pairs can be gamed by text that
raises its score without being more positive to another reader; a judge that the policy was never trained
against shows that gap (docs/metrics.md, `rlhf/judge_positive_share`). `resolve_reward_function` refuses this
module by name, and it is not a registered reward function.

A text is positive when VADER's compound score is >= 0.05, the threshold its authors recommend.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

POSITIVE_THRESHOLD = 0.05
"""VADER's recommended cut: compound >= 0.05 positive, <= -0.05 negative, neutral in between."""


@functools.lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:  # a missing judge is an install problem, said in one line
        from ppolm.errors import PpolmError

        raise PpolmError(f"the independent judge needs vaderSentiment ({exc}): pip install vaderSentiment") from None
    return SentimentIntensityAnalyzer()


def judge_compound(texts: Sequence[str]) -> list[float]:
    """VADER compound score of each text, (B,) floats in [-1, 1] (0.0 for an empty text)."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) if t.strip() else 0.0 for t in texts]


def positive_share(compound: Sequence[float], threshold: float = POSITIVE_THRESHOLD) -> float:
    """Share of texts the judge calls positive: mean(compound_b >= threshold) over (B,). 0.0 for no texts."""
    return sum(c >= threshold for c in compound) / len(compound) if compound else 0.0
