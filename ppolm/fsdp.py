"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the trainers: sharding, rollout with sharded weights,
the global gradient norm and full state dicts for export.

Requested the usual way, `accelerate launch --config_file configs/accelerate/fsdp2-cpu.yaml ...` (the launcher
sets ACCELERATE_USE_FSDP / FSDP_VERSION). The sharding is done here and not by `accelerator.prepare`, because
accelerate only enables FSDP on accelerators (a CPU run would silently fall back to DDP) and because the
optimizer must be built on the sharded parameters, which `prepare` would swap after the fact.

Layout: every transformer block (each model's `_no_split_modules` classes) is its own FSDP unit, the rest of a
model tree (embeddings, final norm, LM head, value head) is the root unit. FSDP2 keeps the root unsharded from
its forward until the end of backward, which is what lets `lm_logits_fp32` read the LM head's weight right
after the backbone forward, and lets its gradient be reduce-scattered with the rest of the root.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from ppolm.errors import ConfigError


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP; only version 2 is supported (one-line error for FSDP1)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                          "(see configs/accelerate/fsdp2-cpu.yaml)")
    return True


def block_classes(model: nn.Module) -> set[type]:
    """The transformer-block classes of every HF model inside `model` (their `_no_split_modules`)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def shard(model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each transformer block, then the root; in place (parameters become DTensors)."""
    from torch.distributed.fsdp import fully_shard

    classes = block_classes(model)
    for m in list(model.modules()):
        if m is not model and type(m) in classes:
            fully_shard(m, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded_root(model: nn.Module) -> Iterator[None]:
    """Gather the root unit's parameters (embeddings, LM head...) for calls that bypass the root's forward,
    such as `generate` on the policy inside the actor; the blocks gather themselves in their own forward."""
    if not is_sharded(model):
        yield
        return
    # The blocks' hooks must see this root as their root; that link is made lazily by the root's first forward,
    # which a rollout may precede, so make it now (what that forward would do; idempotent).
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of `grads`; sharded (DTensor) gradients are reduced over every process."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every process gathers the full (unsharded) CPU state dict of `module`: a collective, call it on all ranks.
    Tied weights stay one tensor, so save_pretrained still sees them as tied."""
    from torch.distributed.tensor import DTensor

    gathered: dict[int, torch.Tensor] = {}
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if id(value) not in gathered:
            full = value.full_tensor() if isinstance(value, DTensor) else value
            gathered[id(value)] = full.detach().cpu()
        out[name] = gathered[id(value)]
    return out


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the parameters that train (a collective); the keys of `trainable_state`."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name (a collective), as one process would hold it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optimizer_state: dict | None = None) -> None:
    """Shard a full model (and optimizer) state, read by every process, back into the FSDP2 model: each process
    keeps its own shard, so a resume at the same process count continues bit-exactly."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
