"""Out-of-memory recovery: a phase that runs out of memory is retried with its micro-batch halved.

A PPO step's memory peaks in one of its micro-batches (a generate call of the rollout, a scoring forward, a
forward + backward of the update). Where those are too large for the machine, the run need not die: the phase's
micro-batch (ppolm.trainers.micro_batches.MicroBatchSizes) is halved for the rest of the run and the phase runs
again. What a failed try may have touched is put back first, so the retry computes what a run with the smaller
micro-batch from the start computes at that point: the gradients are dropped (no optimizer step is taken inside a
failed try: `Optimization.step` steps only after its last micro-batch's backward), the torch RNG state is restored
(nothing in a step draws from it today; a reward function or model might). The retry unit is one optimizer step
in the update, so earlier optimizer steps of the same PPO step keep their (mathematically equal) larger split.

Only on one process without DeepSpeed: with several processes the others would wait in a collective for the one
that failed, so there the error is raised as before.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import torch

from ppolm.trainers.micro_batches import MicroBatchSizes

T = TypeVar("T")

# What the CPU allocator and the CUDA caching allocator say when an allocation fails (torch.OutOfMemoryError is
# the CUDA one's type; the CPU one raises a plain RuntimeError).
OOM_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocator's out-of-memory error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m.lower() in str(exc).lower() for m in OOM_MESSAGES)


class OOMRecovery:
    """Runs phases, halving `sizes` and retrying on an out-of-memory error (when `enabled`).

    reset: called after each out-of-memory error, before the retry (PPO: drop the gradients).
    retries: out-of-memory errors recovered from so far; events: what each changed ("update: rows ... -> ...").
    """

    def __init__(self, sizes: MicroBatchSizes, enabled: bool, reset: Callable[[], None] | None = None,
                 log: Callable[[str], None] = print):
        self.sizes, self.enabled, self.reset, self.log = sizes, enabled, reset, log
        self.retries = 0
        self.events: list[str] = []

    def run(self, phase: str, fn: Callable[[], T]) -> T:
        """fn(), retried with the micro-batch of `phase` halved after each out-of-memory error until it fits or
        cannot shrink further (then the error is raised)."""
        while True:
            rng = torch.get_rng_state()
            try:
                return fn()
            except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
                if not (self.enabled and is_out_of_memory(exc)):
                    raise
                change = self.sizes.halve(phase)
                if change is None:
                    raise
            # Out of the except block: the traceback, and the tensors its frames held, are gone now.
            torch.set_rng_state(rng)
            if self.reset is not None:
                self.reset()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.retries += 1
            self.events.append(f"{phase}: {change}")
            self.log(f"out of memory in the {phase} phase: {change}, retrying (for the rest of the run)")

    def step_metrics(self, retries_before: int) -> dict[str, float]:
        """The oom/* metrics of a step that started with `retries_before` recovered errors: always the step's
        count; the sizes now only after a step that changed them."""
        n = self.retries - retries_before
        out = {"oom/retries": float(n)}
        if n:
            s = self.sizes
            out["oom/rollout_prompts"] = float(s.rollout_prompts)
            out["oom/micro_rows" if s.max_tokens is None else "oom/max_tokens"] = float(s.max_tokens or s.rows)
        return out


def micro_batching(cfg, runtime, actor: torch.nn.Module) -> tuple[MicroBatchSizes, OOMRecovery]:
    """A PPO run's micro-batch sizes (from its config; the split agrees on a count over `runtime`'s processes) and
    its OOM recovery (ppo.oom_recovery, on one process without DeepSpeed; a retry first drops `actor`'s
    gradients)."""
    sizes = MicroBatchSizes.from_config(cfg)
    if runtime.distributed:
        sizes.agree = lambda n: int(runtime.gather_floats(torch.tensor([float(n)])).max())
    enabled = cfg.ppo.oom_recovery and runtime.world_size == 1 and not runtime.deepspeed
    return sizes, OOMRecovery(sizes, enabled, reset=lambda: actor.zero_grad(set_to_none=True))
