"""The RLHF flow's metric functions (ppolm/eval/rlhf_metrics.py, ppolm/eval/judge.py) on hand-computed numbers."""

import math

import pytest
import torch

from ppolm.errors import ConfigError
from ppolm.eval.judge import judge_compound, positive_share
from ppolm.eval.rlhf_metrics import (
    best_of_n_index, best_of_n_kl, hacking_flags, method_metrics, token_perplexity,
)
from ppolm.rewards.compose import resolve_reward_function


def test_token_perplexity_is_token_weighted():
    # (2 + 4) nats over (1 + 3) tokens -> exp(1.5); an empty text adds nothing
    assert token_perplexity(torch.tensor([2.0, 4.0, 0.0]), torch.tensor([1, 3, 0])) == pytest.approx(math.exp(1.5))
    assert math.isnan(token_perplexity(torch.tensor([0.0]), torch.tensor([0])))


def test_best_of_n_index_takes_the_max_and_the_first_on_a_tie():
    scores = torch.tensor([[0.1, 0.9, 0.3], [2.0, 2.0, -1.0]])
    assert best_of_n_index(scores).tolist() == [1, 0]


def test_best_of_n_kl_hand_values():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)  # 0.6363
    assert best_of_n_kl(16) == pytest.approx(2.7726 - 0.9375, abs=1e-4)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_judge_scores_and_positive_share():
    pos, neg, neutral, empty = judge_compound(["The food was great and the staff friendly.", "Not good at all.",
                                               "The phone is black.", "  "])
    assert pos > 0.5 and neg < -0.05 and neutral == 0.0 and empty == 0.0
    # compound >= 0.05 is positive: 0.05 counts, 0.049 and the neutral 0.0 do not
    assert positive_share([0.05, 0.049, 0.0, 0.9]) == 0.5
    assert positive_share([]) == 0.0


def test_method_metrics_hand_numbers():
    m = method_metrics(["a b a b", "c"], rm_scores=[1.0, 3.0], judge=[0.5, -0.5], kls=[0.2, 0.4],
                       nll=torch.tensor([2.0, 1.0]), tokens=torch.tensor([2, 1]))
    assert m["rm_score"] == 2.0 and m["rm_score_se"] == pytest.approx(1.0)  # std sqrt(2) / sqrt(2)
    assert m["judge_positive_share"] == 0.5 and m["judge_compound"] == 0.0
    assert m["perplexity"] == pytest.approx(math.exp(1.0))
    assert m["distinct_1"] == pytest.approx(3 / 5) and m["distinct_2"] == pytest.approx(2 / 3)
    assert m["length_words"] == 2.5 and m["length_tokens"] == 1.5
    assert m["kl"] == pytest.approx(0.3) and m["kl_se"] == pytest.approx(0.1)
    assert method_metrics(["x"], [0.0], [0.0], None, torch.tensor([1.0]), torch.tensor([1]))["kl"] is None


def test_hacking_flags():
    base = {"rm_score": 0.0, "rm_score_se": 0.1, "judge_positive_share": 0.5, "perplexity": 10.0}
    honest = {"rm_score": 1.0, "rm_score_se": 0.1, "judge_positive_share": 0.8, "perplexity": 12.0}
    assert hacking_flags(honest, base) == []
    hacked = {"rm_score": 1.0, "rm_score_se": 0.1, "judge_positive_share": 0.4, "perplexity": 25.0}
    flags = hacking_flags(hacked, base)
    assert len(flags) == 2 and "fell -0.100" in flags[0] and "2.5x" in flags[1]
    # an rm gain inside the noise (0.2 < 2 x sqrt(0.1^2 + 0.1^2) = 0.283) is no flag, even if the judge falls
    assert hacking_flags({**hacked, "rm_score": 0.2, "perplexity": 10.0}, base) == []


def test_the_judge_is_never_a_reward():
    with pytest.raises(ConfigError, match="never a reward"):
        resolve_reward_function("ppolm.eval.judge:judge_compound")
