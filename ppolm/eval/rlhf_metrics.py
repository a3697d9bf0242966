"""Metrics of the RLHF flow on held-out prompts, each a small pure function (docs/metrics.md, `rlhf/*`).

For every method, one completion per prompt (best-of-n: the one of n samples the reward model scores highest):
reward-model score, the independent judge's positive share (ppolm.eval.judge), perplexity under the base model,
distinct-1/2, mean length and the sequence-level KL to the base model. A method is flagged as reward hacking when
its reward-model score rises clearly above the base model's while the judge's positive share falls, or when its
text is more than twice as perplexing to the base model (Gao et al. 2023: a proxy reward optimized too far).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ppolm.eval.intervals import binomial_se, diff_se, mean_se
from ppolm.eval.judge import positive_share
from ppolm.eval.metrics import distinct_n


def token_perplexity(nll: torch.Tensor, tokens: torch.Tensor) -> float:
    """Token-weighted perplexity of a set of texts: exp(sum_b nll_b / sum_b tokens_b).

    nll: (B,) summed negative log-likelihood of each text's tokens under the scoring model; tokens: (B,) counts.
    Texts with no token add nothing; nan when no text has one."""
    total = float(tokens.sum())
    return math.exp(float(nll.sum()) / total) if total > 0 else float("nan")


def best_of_n_index(scores: torch.Tensor) -> torch.Tensor:
    """Which of n samples best-of-n keeps for each prompt: argmax_j scores[p, j], the first on a tie.

    scores: (P, n) reward-model scores -> (P,) long indices."""
    # torch.argmax returns the first maximal index on CPU and CUDA (documented since torch 1.7)
    return torch.argmax(scores, dim=1)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) per prompt, the analytic value log n - (n - 1) / n (Stiennon et al. 2020, app. G.3;
    an upper bound, exact when the n scores have no ties: Beirami et al. 2024). 0 for n = 1."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def method_metrics(texts: Sequence[str], rm_scores: Sequence[float], judge: Sequence[float],
                   kls: Sequence[float] | None, nll: torch.Tensor, tokens: torch.Tensor) -> dict[str, float | None]:
    """The metrics of one method on P held-out prompts (one completion each).

    texts (P,) completions; rm_scores (P,) reward-model scores; judge (P,) judge compound scores; kls (P,)
    sequence KL to the base model (None: a constant is filled in by the caller, e.g. best_of_n_kl); nll, tokens
    (P,) the base model's summed NLL of each completion and its token count.
    Returns rm_score (+ _se), judge_positive_share (+ _se, binomial), judge_compound, perplexity, distinct_1,
    distinct_2, length_words, length_tokens, kl (+ _se), n."""
    n = len(texts)
    share = positive_share(judge)
    return {
        "n": n,
        "rm_score": sum(rm_scores) / n, "rm_score_se": mean_se(rm_scores),
        "judge_positive_share": share, "judge_positive_share_se": binomial_se(share, n),
        "judge_compound": sum(judge) / n,
        "perplexity": token_perplexity(nll, tokens),
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "length_words": sum(len(t.split()) for t in texts) / n,
        "length_tokens": float(tokens.float().mean()),
        "kl": None if kls is None else sum(kls) / n, "kl_se": None if kls is None else mean_se(kls),
    }


def hacking_flags(m: dict, base: dict, z: float = 2.0, ppl_factor: float = 2.0) -> list[str]:
    """Why a method looks like reward hacking against the base model's metrics, [] when it does not:
    its rm_score is above the base's by more than z standard errors of the difference while its
    judge_positive_share is below the base's, or its perplexity is more than ppl_factor x the base's."""
    out = []
    gain = m["rm_score"] - base["rm_score"]
    if gain > z * diff_se(m.get("rm_score_se"), base.get("rm_score_se")) and \
            m["judge_positive_share"] < base["judge_positive_share"]:
        out.append(f"reward-model score up {gain:+.3f} while the judge's positive share fell "
                   f"{m['judge_positive_share'] - base['judge_positive_share']:+.3f}")
    if m["perplexity"] > ppl_factor * base["perplexity"]:
        out.append(f"perplexity under the base model {m['perplexity'] / base['perplexity']:.1f}x the base's")
    return out
