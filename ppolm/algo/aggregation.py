"""Loss aggregation (`loss.agg`): how a (B, R) matrix of per-token loss terms becomes the scalar that is
differentiated. Shapes: B rows (responses), R response length; m the response mask, l the per-token loss.

| name                    | loss                                              | source                            |
| ----------------------- | ------------------------------------------------- | --------------------------------- |
| token_mean              | sum_i sum_t m_it l_it / sum_i sum_t m_it          | PPO in RLHF (N+ details); DAPO    |
| seq_mean_token_mean     | 1/B' sum_i (sum_t m_it l_it / sum_t m_it)         | Shao et al. 2024 GRPO, eq. 3      |
| seq_mean_token_sum_norm | 1/B sum_i (sum_t m_it l_it / L), L a constant     | Liu et al. 2025 Dr. GRPO          |

token_mean weighs every token alike, so a long response weighs more than a short one. seq_mean_token_mean
weighs every response alike (B' counts the rows with at least one response token): a token of a short
response weighs more, which with a negative advantage favours long wrong answers (the length bias Dr. GRPO
removes). seq_mean_token_sum_norm sums each response's tokens and divides by L = rollout.max_new_tokens, the
same for every row and every step: a per-response sum (the gradient of the sequence log-probability, as in
REINFORCE over whole responses) scaled to the size of a token mean.

Each aggregation is numerator / normaliser, the numerator a sum over rows. Split a minibatch into micro-batches
(and processes), give each the normaliser of the whole minibatch (`agg_norm` summed over them), and the
micro-batch losses add up to the minibatch loss exactly: gradient accumulation and data parallelism give the
full-minibatch gradient in every mode (a micro-batch's share is its tokens for token_mean, its rows for the
sequence modes). Same idea as verl's `agg_loss` with its global token / sequence counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ppolm.ops import masked_sum


def _token_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(x, mask)


def _row_token_means(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # a row without response tokens adds 0 here and is not counted by _rows_with_tokens
    return (masked_sum(x, mask, -1) / mask.sum(-1).clamp(min=1.0)).sum()


def _n_tokens(mask: torch.Tensor, max_len: int | None) -> torch.Tensor:
    return mask.sum()


def _rows_with_tokens(mask: torch.Tensor, max_len: int | None) -> torch.Tensor:
    return (mask.sum(-1) > 0).to(mask.dtype).sum()


def _rows_times_max_len(mask: torch.Tensor, max_len: int | None) -> torch.Tensor:
    length = mask.shape[-1] if max_len is None else max_len
    return torch.tensor(float(mask.shape[0] * length), dtype=mask.dtype, device=mask.device)


@dataclass(frozen=True)
class Aggregation:
    """numerator(x, mask): (B, R), (B, R) -> scalar, a sum over rows; norm(mask, max_len): (B, R) -> scalar, the
    normaliser of these rows (summing it over micro-batches and processes gives the minibatch's)."""

    numerator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    norm: Callable[[torch.Tensor, int | None], torch.Tensor]


AGGREGATIONS: dict[str, Aggregation] = {
    "token_mean": Aggregation(_token_sum, _n_tokens),
    "seq_mean_token_mean": Aggregation(_row_token_means, _rows_with_tokens),
    "seq_mean_token_sum_norm": Aggregation(_token_sum, _rows_times_max_len),
}


def get_aggregation(name: str) -> Aggregation:
    """The registry entry of `name`; a ValueError lists the allowed names."""
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation '{name}' (allowed: {', '.join(AGGREGATIONS)})")
    return AGGREGATIONS[name]


def agg_norm(name: str, mask: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Normaliser of aggregation `name` over the rows of `mask` (B, R) -> scalar: the number of response tokens
    (token_mean), of rows with a response token (seq_mean_token_mean), or rows x max_len
    (seq_mean_token_sum_norm; max_len None means R, which is constant only if every batch is padded to it)."""
    return get_aggregation(name).norm(mask, max_len)


def agg_loss(x: torch.Tensor, mask: torch.Tensor, name: str = "token_mean", norm: float | None = None,
             max_len: int | None = None) -> torch.Tensor:
    """Aggregate per-token terms x (B, R) over mask (B, R) into a scalar with aggregation `name` (table above).

    norm: the normaliser of the whole minibatch when these rows are one micro-batch of it (see the module
    docstring); None uses these rows' own, agg_norm(name, mask, max_len). A normaliser below 1 counts as 1, so
    a mask without tokens gives 0, never NaN.
    """
    agg = get_aggregation(name)
    if norm is None:
        norm = float(agg.norm(mask, max_len))
    return agg.numerator(x, mask) / max(norm, 1.0)
