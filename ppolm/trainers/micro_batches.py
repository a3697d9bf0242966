"""Micro-batches of a PPO step: prompts per generate call in the rollout; rows, or a token budget over packed rows,
in the scoring pass (old log-probs, values, reference log-probs) and the update.

The sizes start from the config and are halved by OOM recovery (ppolm.trainers.oom) for the rest of the run.
Splitting changes no maths: the scoring forward of a row does not depend on the other rows, and the update
divides every micro-batch's loss by the whole minibatch's normaliser (docs/implementation-details.md, item 8),
so any split gives the minibatch's gradient (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ppolm.models.packing import token_budget_batches
from ppolm.trainers.dynamic_sampling import concat_rollouts
from ppolm.types import Rollout


@dataclass
class MicroBatchSizes:
    """The micro-batch sizes a run uses now.

    rollout_prompts  prompts per generate call (rollout.micro_batch_size, default all of rollout.batch_size)
    rows             rows per micro-batch of the scoring and update passes without packing
                     (ppo.minibatch_size / ppo.grad_accum_steps)
    max_tokens       real tokens per packed micro-batch (ppo.max_tokens); None: rows, padded
    largest          rows of the largest micro-batch of the last split (whether halving can still help)
    agree            agree(count) -> the largest count over the processes (None on one process)
    """

    rollout_prompts: int
    rows: int
    max_tokens: int | None
    largest: int = 0
    agree: Callable[[int], int] | None = None

    @classmethod
    def from_config(cls, cfg) -> "MicroBatchSizes":
        r, p = cfg.rollout, cfg.ppo
        return cls(min(r.micro_batch_size or r.batch_size, r.batch_size), p.minibatch_size // p.grad_accum_steps,
                   p.max_tokens)

    @property
    def packed(self) -> bool:
        return self.max_tokens is not None

    def split(self, attention_mask: torch.Tensor) -> list[slice]:
        """Consecutive micro-batches of the B rows of attention_mask (B, T), as slices covering each row once.
        With a token budget the processes may need different counts, while sharded weights (FSDP2, ZeRO-3) need
        the same number of forwards on each: a process with fewer than the largest count (`agree`) splits its
        largest micro-batches in two until it has as many."""
        B = attention_mask.shape[0]
        if self.packed:
            batches = token_budget_batches(attention_mask.sum(-1), self.max_tokens)
            if self.agree is not None:
                batches = split_to_count(batches, self.agree(len(batches)))
        else:
            batches = [slice(s, min(s + self.rows, B)) for s in range(0, B, self.rows)]
        self.largest = max(b.stop - b.start for b in batches)
        return batches

    def halve(self, phase: str) -> str | None:
        """Halve the micro-batch of `phase` ('rollout', or 'score' / 'update', which share theirs); returns what
        changed, or None when it is already one prompt / one row."""
        if phase == "rollout":
            if self.rollout_prompts <= 1:
                return None
            old, self.rollout_prompts = self.rollout_prompts, (self.rollout_prompts + 1) // 2
            return f"rollout prompts per generate call {old} -> {self.rollout_prompts}"
        if self.largest <= 1:
            return None
        if self.packed:
            old, self.max_tokens = self.max_tokens, max(1, self.max_tokens // 2)
            return f"tokens per micro-batch {old} -> {self.max_tokens}"
        old, self.rows = self.rows, (self.rows + 1) // 2
        return f"rows per micro-batch {old} -> {self.rows}"

    def state_dict(self) -> dict[str, int | None]:
        return {"rollout_prompts": self.rollout_prompts, "rows": self.rows, "max_tokens": self.max_tokens}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        self.rollout_prompts, self.rows, self.max_tokens = state["rollout_prompts"], state["rows"], state["max_tokens"]


def split_to_count(batches: list[slice], count: int) -> list[slice]:
    """Split the micro-batch with the most rows (the first of equals) into two consecutive halves until there are
    `count` (at most the number of rows)."""
    batches = list(batches)
    while len(batches) < count:
        i = max(range(len(batches)), key=lambda j: batches[j].stop - batches[j].start)
        b = batches[i]
        if b.stop - b.start < 2:
            break
        mid = b.start + (b.stop - b.start + 1) // 2
        batches[i:i + 1] = [slice(b.start, mid), slice(mid, b.stop)]
    return batches


def over_micro_batches(fn: Callable[[slice], tuple], batches: list[slice]) -> tuple:
    """fn on each consecutive micro-batch, its (rows, ...) outputs concatenated back in row order (None stays
    None). One micro-batch: fn's own outputs, untouched."""
    outs = [fn(b) for b in batches]
    if len(outs) == 1:
        return outs[0]
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs))


def generate_in_chunks(generate: Callable[..., Rollout], prompts: list[list[int]], uniforms: torch.Tensor,
                       texts: list[str], *, k: int, per_call: int, collate, pad_id: int) -> Rollout:
    """The rollout of `prompts` (token id lists, each sampled k times: uniforms and texts have k rows per prompt),
    `per_call` prompts per generate(ids, mask, uniforms, texts) call, rows concatenated in order (prompts re-padded
    on the left, responses on the right). One call when per_call covers every prompt."""
    outs = []
    for s in range(0, len(prompts), per_call):
        ids, mask = collate(prompts[s:s + per_call], pad_id)
        outs.append(generate(ids, mask, uniforms[s * k:(s + per_call) * k], texts[s * k:(s + per_call) * k]))
    return concat_rollouts(outs, pad_id)
