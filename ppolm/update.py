"""The one optimizer step shared by PPO, SFT and reward-model training.

`Optimization.step(micro_batches, loss_fn)` runs forward/backward over micro-batches (gradient accumulation,
no all-reduce until the last), checks that gradients are finite (a non-finite step is skipped and counted; K
in a row abort the run naming the step), clips the global norm, steps AdamW and the LR schedule. Under DeepSpeed
the engine reduces, checks, clips and steps (ppolm.zero); the counting and the schedule stay here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ppolm.errors import PpolmError
from ppolm import zero
from ppolm.fsdp import total_norm
from ppolm.runtime import Runtime

T = TypeVar("T")


class TrainingAborted(PpolmError):
    """Too many optimizer steps in a row had non-finite gradients: the run diverged (not a typo: exit code 3)."""

    exit_code = 3


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step s: linear warmup, then constant / linear / cosine decay."""

    def factor(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class StepResult:
    """What one optimizer step did. grad_norm is NaN for a skipped step."""

    skipped: bool
    grad_norm: float
    lr: float
    metrics: dict[str, float]


class Optimization:
    """AdamW + LR schedule + the guarded step, over the trainable parameters of `model`."""

    def __init__(
        self,
        model: nn.Module,
        runtime: Runtime,
        *,
        param_groups: list[dict[str, Any]],
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        warmup_steps: int,
        total_steps: int,
        schedule: str,
        max_grad_norm: float | None,
        max_nonfinite_steps: int,
    ):
        self.model = model
        self.runtime = runtime
        self.params = [p for g in param_groups for p in g["params"]]
        # The fused kernel is ~4x faster than the default on these CPUs (one pass over params, grads and moments
        # instead of several) and deterministic, so resume stays bit-exact.
        fused = bool(self.params) and all(
            p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
            for p in self.params
        )
        self.optimizer = torch.optim.AdamW(param_groups, betas=betas, eps=eps, weight_decay=weight_decay,
                                           fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(warmup_steps, total_steps, schedule)
        )
        self.max_grad_norm = max_grad_norm
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.steps_done = 0

    def step(
        self,
        micro_batches: Sequence[T],
        loss_fn: Callable[[T], tuple[torch.Tensor, dict[str, float]]],
        *,
        where: str = "",
    ) -> StepResult:
        """One optimizer step over `micro_batches`; loss_fn(mb) returns (loss already scaled so that the sum over
        micro-batches is the minibatch loss, metrics). Metrics are summed over micro-batches."""
        if self.runtime.deepspeed:  # the engine reduces, checks, clips and steps (ppolm.zero)
            applied, norm, metrics = zero.backward_and_step(self.model, micro_batches, loss_fn)
            lr = self.scheduler.get_last_lr()[0]
            return self._finish(applied, norm, lr, metrics, where)
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            with self.runtime.no_sync(self.model, skip=i < len(micro_batches) - 1):
                loss, mb_metrics = loss_fn(mb)
                self.runtime.backward(loss)
            for k, v in mb_metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v)
        for p in self.params:  # a row-sparse embedding gradient no head's dense one absorbed (ppolm.memory)
            if p.grad is not None and p.grad.is_sparse:
                p.grad = p.grad.to_dense()
        grads = [p.grad for p in self.params if p.grad is not None]
        # One fused pass computes the global norm; it is finite exactly when every gradient entry is finite, so
        # it doubles as the NaN/inf check (a per-tensor isfinite scan costs ~3% of a step on a 135M model).
        norm_t = total_norm(grads) if grads else torch.zeros(())  # global over FSDP shards too
        finite = bool(torch.isfinite(norm_t))
        finite = not self.runtime.broadcast_flag(not finite)
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, norm_t)
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return self._finish(finite, float(norm_t), lr, metrics, where)

    def _finish(self, applied: bool, norm: float, lr: float, metrics: dict[str, float], where: str) -> StepResult:
        """Count a skipped (non-finite) step and abort after max_nonfinite_steps in a row; else step the LR
        schedule. The optimizer has already stepped when `applied`."""
        if not applied:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise TrainingAborted(
                    f"{where}: {self.nonfinite_in_a_row} optimizer steps in a row had non-finite gradients; "
                    "aborting (lower optim.lr, check rewards, or raise optim.max_nonfinite_steps)"
                )
            return StepResult(True, float("nan"), lr, metrics)
        self.nonfinite_in_a_row = 0
        self.scheduler.step()
        self.steps_done += 1
        return StepResult(False, norm, lr, metrics)

    def state_dict(self) -> dict[str, Any]:
        """Counters that a checkpoint must restore (optimizer/scheduler tensors are saved by state_io)."""
        return {
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "nonfinite_total": self.nonfinite_total,
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.steps_done = int(state["steps_done"])
