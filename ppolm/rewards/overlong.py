"""DAPO's overlong reward shaping (Yu et al. 2025, "DAPO", "Soft Overlong Punishment"): a length penalty added
to the score of a response that runs into the last `buffer` tokens of the length budget.

    R_length(y) = 0                                         |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache        L_max - L_cache < |y| <= L_max
                = -1                                        |y| > L_max

times `penalty` (verl's `overlong_buffer.penalty_factor`), with L_max = rollout.max_new_tokens and
L_cache = algo.overlong_buffer. The paper's run: L_max 20480, L_cache 4096, factor 1.0 (verl's DAPO recipe). A
response cut at max_new_tokens has |y| = L_max and gets the whole -penalty; a response cannot be longer here.
"""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """lengths (B,) response tokens (EOS included) -> (B,) fp32 penalties in [-penalty, 0] (table above).
    buffer 0 means off: all zeros."""
    lengths = lengths.float()
    if buffer <= 0:
        return torch.zeros_like(lengths)
    excess = (lengths - (max_len - buffer)).clamp(min=0.0)
    return (-excess / buffer).clamp(min=-1.0) * penalty
