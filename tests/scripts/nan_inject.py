"""Inject NaN into gradients of a PPO run at chosen optimizer steps (tests of the non-finite step guard).

`NaNGradients(param, steps)` registers a tensor hook on `param`: on the backward passes whose 0-based index is
in `steps` (one backward per optimizer step when ppo.grad_accum_steps = 1) the gradient gets a NaN in its
first element. `install_always_nan` is a fork-server `setup`: every PPO run built afterwards in the process
gets NaN gradients from its first optimizer step on.
"""

from __future__ import annotations

from collections.abc import Callable, Container

import torch


class NaNGradients:
    """Counts backward passes through `param` and poisons the gradient on the chosen ones."""

    def __init__(self, param: torch.nn.Parameter, steps: Container[int] | Callable[[int], bool]):
        self.calls = 0
        self.poisoned: list[int] = []
        self._steps = steps
        self.handle = param.register_hook(self._hook)

    def _wanted(self, call: int) -> bool:
        return self._steps(call) if callable(self._steps) else call in self._steps

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        call, self.calls = self.calls, self.calls + 1
        if not self._wanted(call):
            return grad
        self.poisoned.append(call)
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad


def target_param(actor: torch.nn.Module) -> torch.nn.Parameter:
    """A policy weight every forward uses: the first trainable parameter of the policy."""
    return next(p for p in actor.policy.parameters() if p.requires_grad)


def install_always_nan() -> None:
    """Patch the PPO trainer's model builder so every optimizer step of every run sees a NaN gradient."""
    from ppolm.trainers import ppo

    build = ppo.build_actor_critic

    def poisoned_build(cfg, amp):
        actor, reference = build(cfg, amp)
        NaNGradients(target_param(actor), lambda call: True)
        return actor, reference

    ppo.build_actor_critic = poisoned_build
