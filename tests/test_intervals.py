"""Standard errors of held-out metrics and the noise-aware comparison (ppolm/eval/intervals.py)."""

import math

import pytest

from ppolm.eval.intervals import (binomial_se, bootstrap_se, clearly_below, diff_se, higher_is_better, interval,
                                  mean_se)


def test_binomial_se_by_hand():
    # p = 0.7 on 200 rows: p~ = (140 + 2) / 204 = 0.696078..., se = sqrt(p~ (1 - p~) / 204) = 0.032202...
    assert binomial_se(0.7, 200) == pytest.approx(math.sqrt(0.696078431 * 0.303921569 / 204), rel=1e-6)
    assert binomial_se(0.7, 200) == pytest.approx(0.032202, abs=1e-6)
    # 8 rows that all agree: p~ = 2 / 12, se = sqrt((1/6)(5/6)/12) = 0.107583, not 0
    assert binomial_se(0.0, 8) == pytest.approx(0.107583, abs=1e-6)
    assert binomial_se(0.5, 0) == 0.0


def test_mean_and_bootstrap_se():
    # values 0, 1, 2, 3: sample var = 5/3, se = sqrt(5/3 / 4) = 0.645497
    assert mean_se([0.0, 1.0, 2.0, 3.0]) == pytest.approx(0.645497, abs=1e-6)
    assert mean_se([1.0]) is None
    # the bootstrap se of a mean approaches the analytic one (n = 400 draws of 0/1 at p = 0.25: 0.02165)
    rows = [1.0] * 100 + [0.0] * 300
    se = bootstrap_se(lambda idx: sum(rows[i] for i in idx) / len(idx), len(rows), n_boot=400, seed=1)
    assert se == pytest.approx(math.sqrt(0.25 * 0.75 / 400), rel=0.15)
    assert bootstrap_se(lambda idx: None, 10) is None and bootstrap_se(lambda idx: 1.0, 1) is None


def test_clearly_below_needs_both_the_margin_and_the_noise():
    assert diff_se(0.03, 0.04) == pytest.approx(0.05)
    # 0.109 below, margin 0.1, se of the difference 0.0836: under 2 se -> not clearly below
    assert not clearly_below(0.594, 0.061, 0.703, 0.057, margin=0.1)
    assert clearly_below(0.594, 0.016, 0.703, 0.015, margin=0.1)     # 2 se = 0.044 < 0.109
    assert not clearly_below(0.62, 0.016, 0.703, 0.015, margin=0.1)  # beyond the noise, within the margin
    assert clearly_below(0.594, 0.061, 0.703, 0.057, margin=0.1, z=0.0)
    # lower is better: a TER of 70 is worse than 60
    assert clearly_below(70.0, 1.0, 60.0, 1.0, higher=False) and not clearly_below(50.0, 1.0, 60.0, 1.0, higher=False)
    assert not higher_is_better("ter") and higher_is_better("accuracy")


def test_interval_text():
    assert interval(0.873, 0.0272) == "0.8730 ± 0.0533"
    assert interval(0.5, None) == "0.5000" and interval(None, 0.1) == "None"
