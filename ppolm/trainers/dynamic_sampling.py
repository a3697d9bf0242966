"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO", "Dynamic Sampling"): drop the groups whose responses all got
the same reward (their group advantage is 0: no gradient, only a smaller effective batch) and sample more prompts
until the batch is full again, or until `algo.dynamic_sampling_max_rounds` generation rounds have run.

A round samples `rollout.batch_size` prompts per process, k responses each. Round 0 is the step's regular rows
(`ppolm.trainers.prompts.step_rows`); refill round r >= 1 of step s reads positions of a permutation of the prompt
set seeded by (seed, s, r), and its responses draw from random streams of their own (REFILL_STREAM + ...), so
the regular data stream, its resume position and the samples of a run without dynamic sampling are unchanged, and
a resumed run samples the same refills. A refill prompt may repeat a prompt of the same step.

Each process keeps its own groups: every process runs the same number of rounds (continue while any process is
short, agreed through the runtime), then trains on its first `batch_size` varied groups in sampling order. If the
bound is hit first, the batch is filled with dropped groups (counted): the batch shape never changes, and those
groups add nothing to the policy gradient of a group estimator beyond what the step had without the filter.
verl's DAPO recipe (max_num_gen_batches: 10 batches of 3x the prompts) raises an error there instead.
The filter reads the raw score (reward functions + reward model, non-finite as 0): DAPO filters on accuracy,
before its overlong penalty, so neither the missing-EOS penalty nor the overlong penalty counts here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ppolm.types import Rollout

# Refill rows draw from stream ids REFILL_STREAM + ((round - 1) * G + position) * k + j; the regular rows of a
# step use position * k + j with position < (step + 1) * G, far below 2^40.
REFILL_STREAM = 1 << 40


def varied_groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) per-response values in groups of k contiguous rows -> (N / k,) bool: True where the group's values
    are not all equal (the groups dynamic sampling keeps)."""
    g = values.float().view(-1, group_size)
    return (g != g[:, :1]).any(-1)


@functools.lru_cache(maxsize=8)
def _refill_order(n: int, seed: int, step: int, round_: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + round_) * 7_919 + epoch + 1)
    return torch.randperm(n, generator=gen)


def refill_rows(n: int, seed: int, step: int, round_: int, global_batch: int, rank: int,
                local_batch: int) -> list[tuple[int, int]]:
    """(position in the round, example index) of this process's prompts in refill round `round_` >= 1 of `step`:
    positions [rank * local_batch, ...) of a permutation of range(n) that depends only on (seed, step, round)
    (several permutations in a row when the round needs more than n prompts)."""
    rows = []
    for pos in range(rank * local_batch, (rank + 1) * local_batch):
        epoch, offset = divmod(pos, n)
        rows.append((pos, int(_refill_order(n, seed, step, round_, epoch)[offset])))
    return rows


def refill_streams(rows: list[tuple[int, int]], round_: int, global_batch: int, group_size: int) -> list[int]:
    """Random-stream ids of the k samples of each refill row (see REFILL_STREAM)."""
    base = REFILL_STREAM + (round_ - 1) * global_batch * group_size
    return [base + pos * group_size + j for pos, _ in rows for j in range(group_size)]


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Rows of several rollouts in order, prompts re-padded on the left and responses on the right to the widest."""
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompt_ids.shape[1] for r in rollouts)
    R = max(r.response_ids.shape[1] for r in rollouts)

    def pad(x: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
        extra = width - x.shape[1]
        return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

    return Rollout(
        prompt_ids=torch.cat([pad(r.prompt_ids, P, pad_id, True) for r in rollouts]),
        prompt_mask=torch.cat([pad(r.prompt_mask, P, 0.0, True) for r in rollouts]),
        response_ids=torch.cat([pad(r.response_ids, R, pad_id, False) for r in rollouts]),
        response_mask=torch.cat([pad(r.response_mask, R, 0.0, False) for r in rollouts]),
        ended=torch.cat([r.ended for r in rollouts]),
        prompts=[p for r in rollouts for p in r.prompts],
        completions=[c for r in rollouts for c in r.completions],
    )


def select_rows(rollout: Rollout, index: list[int]) -> Rollout:
    """Rows `index` of a rollout, in that order."""
    i = torch.tensor(index, dtype=torch.long)
    on = lambda x: x[i.to(x.device)]  # noqa: E731
    return Rollout(on(rollout.prompt_ids), on(rollout.prompt_mask), on(rollout.response_ids),
                   on(rollout.response_mask), on(rollout.ended), [rollout.prompts[j] for j in index],
                   [rollout.completions[j] for j in index])


@dataclass(frozen=True)
class Round:
    """One generation round on this process: rollout (N rows), scores (N,) as the update uses them, raw (N,) the
    values the filter compares (raw scores, non-finite as 0)."""

    rollout: Rollout
    scores: torch.Tensor
    raw: torch.Tensor


def fill_batch(first: Round, sample: Callable[[int], Round], *, groups: int, group_size: int, max_rounds: int,
               any_short: Callable[[bool], bool], global_sum: Callable[[float], float],
               pad_id: int) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
    """Keep the varied groups of `first` and of further rounds sample(1), sample(2), ... until this process and
    every other one (`any_short(this process is short)` -> whether any is) holds `groups` of them, or `max_rounds`
    rounds have run; fill what is missing with dropped groups. Returns the batch (groups x k rows: varied groups
    in sampling order, then the fill), its scores, and the dynamic_sampling/* metrics (global: `global_sum`)."""
    rounds, kept, dropped = [first], [], []
    while True:
        r = len(rounds) - 1
        flags = varied_groups(rounds[r].raw, group_size).tolist()
        offset = sum(x.scores.shape[0] for x in rounds[:r])
        for g, varied in enumerate(flags):
            (kept if varied else dropped).append(offset + g * group_size)
        if len(rounds) >= max_rounds or not any_short(len(kept) < groups):
            break
        rounds.append(sample(len(rounds)))
    starts = kept[:groups]
    filled = groups - len(starts)
    starts += dropped[:filled]
    index = [s + j for s in starts for j in range(group_size)]
    batch = select_rows(concat_rollouts([x.rollout for x in rounds], pad_id), index)
    all_scores = torch.cat([x.scores for x in rounds])
    scores = all_scores[torch.tensor(index, dtype=torch.long, device=all_scores.device)]
    return batch, scores, {
        "dynamic_sampling/rounds": float(len(rounds)),
        "dynamic_sampling/dropped_groups": global_sum(float(len(dropped))),
        "dynamic_sampling/filled_groups": global_sum(float(filled)),
    }
