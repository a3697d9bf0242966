"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the trainers: sharding, rollout with sharded weights,
the global gradient norm, full state dicts for export and sharded checkpoints (torch.distributed.checkpoint).

Requested the usual way, `accelerate launch --config_file configs/accelerate/fsdp2-cpu.yaml ...` (the launcher
sets ACCELERATE_USE_FSDP / FSDP_VERSION). The sharding is done here and not by `accelerator.prepare`, because
accelerate only enables FSDP on accelerators (a CPU run would silently fall back to DDP) and because the
optimizer must be built on the sharded parameters, which `prepare` would swap after the fact.

Layout: every transformer block (each model's `_no_split_modules` classes) is its own FSDP unit; so is each HF
model below the root (the policy, a critic backbone, the LM of SFT), holding its embeddings, final norm and LM
head, so that `generate` or an evaluation can call it directly; the root holds the rest (a value head). An HF
model's unit stays gathered from its forward until its backward, which is what lets `lm_logits_fp32` read
the LM head's weight right after the backbone forward, with its gradient reduce-scattered by FSDP as usual.
"""

from __future__ import annotations

import os
from collections.abc import Callable

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
    """fully_shard each transformer block, each outermost HF model below the root, then the root; in place
    (parameters become DTensors). Refuses LoRA (peft) models in one line."""
    from torch.distributed.fsdp import fully_shard

    if any(hasattr(m, "peft_config") for m in model.modules()):
        raise ConfigError("lora.enabled with FSDP is not supported; use the DDP launch config "
                          "(configs/accelerate/cpu-ddp-2.yaml) or full fine-tuning")
    classes = block_classes(model)
    for m in list(model.modules()):
        if m is not model and type(m) in classes:
            fully_shard(m, reshard_after_forward=reshard_after_forward)
    for m in _outermost_hf_models(model):
        # kept gathered from its forward to its backward: the LM head is read right after the forward
        fully_shard(m, reshard_after_forward=False)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    # A unit's first forward links it to its root lazily; rollout and evaluation call the policy before any
    # forward of the root, so link now (what the root's first forward would do; idempotent).
    model._get_fsdp_state()._lazy_init()
    return model


def _outermost_hf_models(model: nn.Module) -> list[nn.Module]:
    """The HF models inside `model` (not `model` itself) that no other HF model below `model` contains: the
    policy and critic backbone of an ActorCritic, the LM of an SFT scorer. An HF model is called directly
    (generate, the critic) so it must gather its own embeddings and head."""
    from transformers import PreTrainedModel

    found: list[nn.Module] = []
    if isinstance(model, PreTrainedModel):  # its inner base model may share tied weights with its head
        return found

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, PreTrainedModel):
                found.append(child)
            else:
                walk(child)

    walk(model)
    return found


def reshard(model: nn.Module) -> None:
    """Put every unit of `model` back to its shards. An HF model's unit stays gathered after a no-grad forward
    (rollout, evaluation) until its next backward; the state-dict code must see the sharded parameters that
    the optimizer holds, and the gathered copy is memory the rest of the step can use."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of `grads`; sharded (DTensor) gradients are reduced over every process."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def gathered_state_dict(module: nn.Module, keep: bool,
                        gather: Callable[[torch.Tensor, bool], torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """`module`'s state dict with each tensor replaced by gather(tensor, keep): its full CPU copy where `keep`
    (the main process), None elsewhere; {} where not `keep`. gather is called on every process, once per
    distinct tensor (a collective per sharded one), so a tied weight is gathered once and stays one tensor,
    which save_pretrained still sees as tied; one tensor at a time, so no process holds the whole model."""
    gathered: dict[int, torch.Tensor | None] = {}
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if id(value) not in gathered:
            gathered[id(value)] = gather(value, keep)
        if keep:
            out[name] = gathered[id(value)]
    return out


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) CPU state dict of an FSDP2 `module` on the main process, {} on the others (which
    only take part in the gathers: a collective, call it on every process)."""
    from torch.distributed.tensor import DTensor

    def gather(value: torch.Tensor, keep: bool) -> torch.Tensor | None:
        full = value.full_tensor() if isinstance(value, DTensor) else value
        return full.detach().cpu() if keep else None

    reshard(module)
    return gathered_state_dict(module, _is_main(), gather)


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the parameters that train on the main process, {} on the others (a collective);
    the keys of `trainable_state`."""
    from torch.distributed.tensor import DTensor

    reshard(model)
    keep = _is_main()
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            full = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            if keep:
                out[n] = full
    return out


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name, as one process would hold it, on the main process
    (cpu_offload: the others end with an empty state; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    reshard(model)
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
    reshard(model)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Every process writes its own shards of `model`'s and `optimizer`'s state into `directory`
    (torch.distributed.checkpoint: one file per process plus the main process's `.metadata`; a collective). No
    process ever holds the full state, unlike `full_state_dict`; the directory must be one all processes see."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    reshard(model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Read what `save_sharded` wrote back into the sharded `model` and `optimizer` (a collective); at the same
    process count each process reads back exactly its own shards, so the run continues bit-exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    reshard(model)
    # the current (sharded) states give the layout to load into; the optimizer's is materialised if still empty
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
