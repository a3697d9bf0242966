"""DeepSpeed ZeRO for the trainers: the engine, the guarded step through it, and its sharded checkpoints.

Requested the usual way, `accelerate launch --config_file configs/accelerate/deepspeed-zero2-cpu.yaml ...` (the
launcher sets ACCELERATE_USE_DEEPSPEED and ACCELERATE_DEEPSPEED_*). `deepspeed.initialize` is called here and
not through `accelerator.prepare`: accelerate enables DeepSpeed only on accelerators (a CPU run silently falls
back to DDP), its prepare needs a dataloader or a model `.config` to fill "auto" values, and its `backward`
steps the engine behind our back. Here the engine gets ppolm's own AdamW (built on the same parameter groups,
the LR schedule stays ours) and a config where ppolm's micro-batching is the only accumulation.

What the engine owns that `Optimization.step` does itself elsewhere: the gradient reduction (partitioned under
ZeRO-2: no process holds the whole gradient, so the global norm, the finiteness check and clipping are
DeepSpeed's: `gradient_clipping` = optim.max_grad_norm, and a step whose gradients are not finite is skipped
by the engine and counted by us, exactly like the guarded step).

ZeRO-3 also partitions the weights of the trained models (policy and critic, SFT's LM, the reward model being
trained; a frozen reference stays whole on each process): each module's forward gathers its own weights, so
the rollout and evaluations run on every process in lockstep (as under FSDP2), the fp32 LM head is applied
through its module, and exports gather one tensor at a time (`full_state_dict`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from ppolm.errors import CheckpointError, ConfigError
from ppolm.fsdp import gathered_state_dict

TAG = "zero"  # the engine's checkpoint tag: one per checkpoint directory, ours names the step


def deepspeed_requested() -> bool:
    """True when the launcher asked for DeepSpeed (accelerate's DEEPSPEED distributed type)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_launch() -> None:
    """Refuse, in one line and before any model loads, a DeepSpeed launch this module cannot run correctly."""
    stage = zero_stage()
    if stage not in (1, 2, 3):  # stage 0 would apply a step with non-finite fp32 gradients (no overflow check)
        raise ConfigError(f"DeepSpeed ZeRO stage {stage} is not supported (1, 2 or 3)")
    if stage == 3 and os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true":
        raise ConfigError("zero3_init_flag: true is not supported (models are built whole, then partitioned by "
                          "the engine); set it to false in the accelerate config")
    accum = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if accum not in ("1", "auto"):
        raise ConfigError(f"accelerate gradient_accumulation_steps={accum} under DeepSpeed: set ppolm's own "
                          "(ppo.grad_accum_steps, grad_accum_steps in SFT/RM) and leave it at 1")
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed != "no":
        raise ConfigError(f"accelerate mixed_precision '{mixed}' under DeepSpeed: leave it 'no' and set ppolm's "
                          "precision=bf16 (autocast over fp32 weights, the same numerics as the other launches)")
    user = user_config()
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(f"{user_config_path()}: the DeepSpeed config file sets '{key}': ppolm builds its own "
                              "AdamW and LR schedule from the run config (optim.*); remove it from the file")
    for key in ("fp16", "bf16"):
        if user.get(key, {}).get("enabled") in (True, "true"):
            raise ConfigError(f"{user_config_path()}: the DeepSpeed config file enables {key}: leave it off and set "
                              "ppolm's precision (bf16 autocast over fp32 weights)")
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"this launch asks for DeepSpeed but it does not import ({e}); install the extra: "
                          "DS_BUILD_OPS=0 pip install -e '.[deepspeed]'") from None


def user_config_path() -> str:
    """The DeepSpeed JSON config named by the accelerate config (deepspeed_config_file), "" when none."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    return "" if path == "none" else path


def user_config() -> dict[str, Any]:
    """The DeepSpeed JSON config named by the accelerate config (deepspeed_config_file), {} when none."""
    path = user_config_path()
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the DeepSpeed config ({e})") from None


def zero_stage() -> int:
    user = user_config().get("zero_optimization", {})
    return int(user.get("stage", os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")))


def engine_config(max_grad_norm: float | None, hidden_size: int | None = None) -> dict[str, Any]:
    """The engine's config: the user's file (if any) with the launcher's stage and offload settings, one
    micro-batch per engine step (ppolm accumulates itself), clipping at optim.max_grad_norm (0 = off), and the
    bucket sizes accelerate derives from the model's hidden size H where the file leaves them out (DeepSpeed's
    own defaults, 5e8-element buckets, cost ZeRO-3 more memory per process than DDP on the embedded model)."""
    cfg = user_config()
    zero = dict(cfg.get("zero_optimization", {}))
    zero.setdefault("stage", zero_stage())
    if hidden_size:
        zero.setdefault("reduce_bucket_size", hidden_size * hidden_size)
        if zero["stage"] == 3:
            zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
            zero.setdefault("stage3_param_persistence_threshold", 10 * hidden_size)
    device = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    if device not in ("", "none") and "offload_optimizer" not in zero:
        zero["offload_optimizer"] = {"device": device}
    device = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    if device not in ("", "none") and "offload_param" not in zero and zero["stage"] == 3:
        zero["offload_param"] = {"device": device}
    cfg.update({
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "gradient_clipping": float(max_grad_norm or 0.0), "zero_optimization": zero,
        # ppolm's fused torch AdamW is the optimizer (DeepSpeed calls it on its flat fp32 partitions)
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62, "wall_clock_breakdown": False,
    })
    return cfg


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None):
    """(engine, ZeRO optimizer) around `model` and ppolm's `optimizer` (whose param groups, and so the LR
    schedule built on it, stay the ones DeepSpeed steps)."""
    import deepspeed

    if zero_stage() == 3 and any(hasattr(m, "peft_config") for m in model.modules()):
        raise ConfigError("lora.enabled with DeepSpeed ZeRO-3 is not supported; use ZeRO-2 "
                          "(configs/accelerate/deepspeed-zero2-cpu.yaml) or full fine-tuning")
    # the largest hidden size of the HF models inside (policy, critic backbone), as accelerate reads model.config
    hidden = max((getattr(m.config, "hidden_size", 0) or 0 for m in model.modules()
                  if isinstance(getattr(m, "config", None), PretrainedConfig)), default=0)
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                        config=engine_config(max_grad_norm, hidden or None),
                                                        dist_init_required=False)
    return engine, zero_optimizer


def backward_and_step(engine, micro_batches, loss_fn) -> tuple[bool, float, dict[str, float]]:
    """Forward/backward over `micro_batches` (the engine reduces at the last one), then one engine step:
    (applied, pre-clipping global grad norm, summed metrics). Not applied = non-finite gradients, skipped by the
    engine (its norm is then inf)."""
    metrics: dict[str, float] = {}
    for i, mb in enumerate(micro_batches):
        engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
        loss, mb_metrics = loss_fn(mb)
        engine.backward(loss, scale_wrt_gas=False)  # the losses are already scaled to sum to the minibatch's
        for k, v in mb_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else float("nan")
    return bool(engine.was_step_applied()) and math.isfinite(norm), norm, metrics


def save(engine, directory: str | os.PathLike) -> None:
    """Every process writes its partition of the optimizer state (and the main one the weights) into
    `directory` (a collective; DeepSpeed's own files, read back by `load`)."""
    engine.save_checkpoint(str(directory), tag=TAG, client_state={}, save_latest=False)


def load(engine, directory: str | os.PathLike) -> None:
    """Read what `save` wrote back into the engine: weights, each process's optimizer partition (the LR
    schedule and counters are ppolm's, restored from its own files)."""
    path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"{directory}: no DeepSpeed checkpoint '{TAG}' in it")


def full_state_dict(module: nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """The full CPU state dict of a ZeRO-3-partitioned `module` on the main process, {} on the others (a
    collective: every process takes part in each gather; one parameter at a time, ties kept)."""
    import deepspeed

    def gather(value: torch.Tensor, keep: bool) -> torch.Tensor | None:
        if not hasattr(value, "ds_id"):  # a buffer or a parameter ZeRO keeps whole
            return value.detach().cpu() if keep else None
        with deepspeed.zero.GatheredParameters([value]):  # the data is released again on exit: copy it out
            return value.detach().cpu().clone() if keep else None

    return gathered_state_dict(module, is_main, gather)
