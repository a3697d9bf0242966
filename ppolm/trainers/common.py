"""What SFT and reward-model training share: model set-up (dropout, LoRA, checkpointing of activations), the
optimizer from the config, the step count, the held-out split, checkpoints with exact resume, the final export
and the step loop itself.

A checkpoint of these trainers (checkpoint-N/, written crash-safely by CheckpointManager) holds:
  trainable.safetensors  the trainable parameters only (all weights, or LoRA adapters + a reward head)
  optimizer.*            AdamW state (safetensors + json, no pickle); scheduler.* likewise
  rng.*, rng-rank<r>.*   python / numpy / torch RNG states of each process
  trainer_state.json     step, optimizer counters, config and data fingerprints, process count
Frozen weights are not saved: they are rebuilt from the source model, which the config fingerprint pins.
Under FSDP2 the same files are written, from the full states gathered to the main process; with
checkpoint.sharded, sharded/ (each process's shards, torch.distributed.checkpoint) replaces trainable.* and
optimizer.*; under DeepSpeed ZeRO sharded/ always holds the engine's own files instead.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import random
import shutil
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ppolm.checkpoint import CheckpointManager
from ppolm.config import LoraConfig, OptimConfig
from ppolm.errors import CheckpointError
from ppolm.memory import enable_activation_checkpointing
from ppolm import fsdp, zero
from ppolm.logger import MetricsLogger
from ppolm.models.policy import apply_lora, disable_dropout
from ppolm.runtime import Runtime
from ppolm.state_io import (
    atomic_directory, get_rng_state, load_json, load_optimizer_state, load_rng_state, load_scheduler_state,
    load_state, save_json, save_optimizer_state, save_rng_state, save_scheduler_state, save_state,
)
from ppolm.trainers.resume import check_same_run, config_fingerprint
from ppolm.trainers.run_dir import StopSignals
from ppolm.update import Optimization

if TYPE_CHECKING:
    from ppolm.trainers.watch import Watch

T = TypeVar("T")



def prepare_model(
    model: PreTrainedModel, lora: LoraConfig, *, task_type: str, gradient_checkpointing: bool | str
) -> PreTrainedModel:
    """Dropout off (so accumulation and resume are exact), optional activation checkpointing, optional LoRA.

    task_type 'CAUSAL_LM' (SFT) or 'SEQ_CLS' (reward model: peft then also trains the new `score` head in full,
    which a LoRA on a randomly initialized head could not do well).
    """
    disable_dropout(model)
    enable_activation_checkpointing(model, gradient_checkpointing)
    if not lora.enabled:
        return model
    if task_type == "CAUSAL_LM":
        return apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=lora.target_modules, task_type=task_type)
    return get_peft_model(model, cfg)


def is_lora(model: nn.Module) -> bool:
    """True for a peft-wrapped model."""
    return hasattr(model, "disable_adapter")


def make_optimization(model: nn.Module, runtime: Runtime, optim: OptimConfig, total_steps: int) -> Optimization:
    """The shared optimizer step over the trainable parameters of `model`, configured from `optim`."""
    params = [p for p in model.parameters() if p.requires_grad]
    return Optimization(
        model, runtime, param_groups=[{"params": params, "lr": optim.lr}], betas=optim.betas, eps=optim.eps,
        weight_decay=optim.weight_decay, warmup_steps=optim.warmup_steps, total_steps=total_steps,
        schedule=optim.schedule, max_grad_norm=optim.max_grad_norm, max_nonfinite_steps=optim.max_nonfinite_steps,
    )


def total_steps(max_steps: int, epochs: float | None, n_rows: int, global_batch: int) -> int:
    """Optimizer steps of the run: max_steps, or ceil(epochs x n_rows / global_batch) when epochs is set."""
    if epochs is None:
        return max_steps
    return max(1, math.ceil(epochs * n_rows / global_batch))


def split_held_out(rows: list[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held_out) after a seeded shuffle: round(eval_fraction x n) rows are held out (at least 1 when
    the fraction is positive and there are 2+ rows, never all). Both keep the file order."""
    order = list(range(len(rows)))
    random.Random(seed * 104729 + 3).shuffle(order)
    n_eval = 0
    if eval_fraction > 0 and len(rows) > 1:
        n_eval = min(len(rows) - 1, max(1, round(eval_fraction * len(rows))))
    return [rows[i] for i in sorted(order[n_eval:])], [rows[i] for i in sorted(order[:n_eval])]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train (tied weights appear once: named_parameters dedups them)."""
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Copy `state` into the trainable parameters of `model`; every trainable one must be present."""
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)


SHARDED = "sharded"  # the directory of a checkpoint that holds each process's shards (FSDP2 or DeepSpeed ZeRO)


def writes_shards(runtime: Runtime, sharded: bool) -> bool:
    """Checkpoints hold each process's shards: always under DeepSpeed (its partitioned optimizer state has no
    gathered form here), under FSDP2 when checkpoint.sharded asks for it."""
    return runtime.deepspeed or (runtime.fsdp and sharded)


def save_with_shards(runtime: Runtime, manager: CheckpointManager, step: int, root: nn.Module,
                     optimizer: torch.optim.Optimizer, write_rest: Callable[[Path], None]) -> Path | None:
    """A crash-safe checkpoint whose weights and optimizer state are shards (FSDP2's, or the DeepSpeed engine's
    files when `root` is an engine; a collective): every process writes its shards into the main process's
    staging directory, then the main process moves them to checkpoint-`step`/sharded/ inside the usual save
    (`write_rest` writes the other files), so the manifest covers every shard and LATEST moves only once all of
    them are on disk."""
    staging = Path(runtime.gather_object(str(manager.staging_dir(step)) if runtime.is_main else None)[0])
    if runtime.is_main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crashed save of the same step
        staging.mkdir(parents=True)
    runtime.wait()
    if runtime.deepspeed:
        zero.save(root, staging)
    else:
        fsdp.save_sharded(root, optimizer, staging)
    runtime.wait()
    path = None
    if runtime.is_main:
        def write(out: Path) -> None:
            os.rename(staging, out / SHARDED)
            write_rest(out)

        path = manager.save(step, write)
    runtime.wait()
    return path


def load_shards(runtime: Runtime, path: Path, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load checkpoint `path`'s shards (its sharded/ directory) into `root` (an FSDP2 model, or the DeepSpeed
    engine) and `optimizer`; the launch must be the kind that wrote them."""
    by_zero = (path / SHARDED / zero.TAG).is_dir()
    if by_zero and not runtime.deepspeed:
        raise CheckpointError(f"{path.name} holds DeepSpeed ZeRO shards: resume it under the DeepSpeed launch "
                              f"that wrote it (accelerate launch --config_file <deepspeed config> ...) [{path}]")
    if not by_zero and not runtime.fsdp:
        raise CheckpointError(f"{path.name} holds FSDP2 shards (checkpoint.sharded): resume it under the FSDP2 "
                              f"launch that wrote it (accelerate launch --config_file <fsdp2 config> ...) [{path}]")
    if by_zero:
        zero.load(root, path / SHARDED)
    else:
        fsdp.load_sharded(root, optimizer, path / SHARDED)


class Checkpointer:
    """Save / resume of one run, the part every trainer shares: the weights and optimizer state as shards
    (checkpoint.sharded, or DeepSpeed), as the full states gathered from FSDP2, or as one process holds them;
    then the scheduler, every process's RNG streams and trainer_state.json, and the same-run checks on resume.
    A subclass says which weights it holds (`write_weights`, `load_weights`, `gather_weights`, `full_weights`)
    and what else its trainer_state.json records (`extra_state`, `load_extra_state`)."""

    def __init__(self, runtime: Runtime, config: Any, optim: Optimization, data_fp: str):
        self.runtime, self.cfg, self.optim, self.data_fp = runtime, config, optim, data_fp
        self.manager = CheckpointManager(config.output_dir, keep=config.checkpoint.keep)

    def fsdp_root(self) -> nn.Module:
        """The FSDP2-sharded module the optimizer's state is named from."""
        return self.optim.model

    def gather_weights(self) -> dict[str, torch.Tensor]:
        """Under FSDP2: the full weights on the main process ({} on the others); a collective."""
        raise NotImplementedError

    def write_weights(self, out: Path, state: dict[str, torch.Tensor] | None) -> None:
        """Write the weight files into checkpoint directory `out`: from `state` (gather_weights' result), or
        from the live model when None."""
        raise NotImplementedError

    def load_weights(self, path: Path) -> None:
        """Load checkpoint `path`'s weight files into the live (unsharded) model."""
        raise NotImplementedError

    def full_weights(self, path: Path) -> dict[str, torch.Tensor]:
        """Checkpoint `path`'s weight files named from `fsdp_root`, for fsdp.load_full_state."""
        raise NotImplementedError

    def extra_state(self, step: int) -> dict[str, Any]:
        """What trainer_state.json holds besides the step, optimizer counters, world size and fingerprints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` wrote."""

    def _write(self, step: int, out: Path, rng_states: list | None = None, full: tuple | None = None,
               sharded: bool = False) -> None:
        # sharded: the weights and optimizer state are already in out/sharded
        if full is not None:  # FSDP2: the full states every process gathered (same files as one process writes)
            self.write_weights(out, full[0])
            save_state(full[1], out / "optimizer", kind="optimizer")
        elif not sharded:
            self.write_weights(out, None)
            save_optimizer_state(self.optim.optimizer, out / "optimizer")
        save_scheduler_state(self.optim.scheduler, out / "scheduler")
        save_rng_state(out / "rng", rng_states)
        save_json(out / "trainer_state.json", {
            "step": step, **self.extra_state(step), "optimization": self.optim.state_dict(),
            "world_size": self.runtime.world_size, "config": config_fingerprint(self.cfg), "data": self.data_fp,
        })

    def save(self, step: int) -> Path | None:
        """Main process writes checkpoint-`step`; every process waits for it."""
        rt, path = self.runtime, None
        rng_states = rt.gather_object(get_rng_state())  # every rank's streams, written by the main one
        if writes_shards(rt, self.cfg.checkpoint.sharded):  # (self.optim.model: the engine under DeepSpeed)
            return save_with_shards(rt, self.manager, step, self.optim.model, self.optim.optimizer,
                                    lambda out: self._write(step, out, rng_states, sharded=True))
        full = ((self.gather_weights(), fsdp.full_optimizer_state(self.fsdp_root(), self.optim.optimizer))
                if rt.fsdp else None)
        if rt.is_main:
            path = self.manager.save(step, lambda out: self._write(step, out, rng_states, full))
        rt.wait()
        return path

    def maybe_resume(self) -> int:
        """Load the latest valid checkpoint; returns the step to continue from (0 when none)."""
        rt = self.runtime
        log = print if rt.is_main else (lambda _msg: None)
        path = self.manager.latest_valid(log=log)
        if path is None:
            return 0
        state = load_json(path / "trainer_state.json")
        check_same_run(state, path, config=self.cfg, data_fp=self.data_fp, world_size=rt.world_size,
                       allow_changed=self.cfg.allow_changed_resume, is_main=rt.is_main)
        if (path / SHARDED).is_dir():
            load_shards(rt, path, self.optim.model, self.optim.optimizer)
        elif rt.fsdp:
            fsdp.load_full_state(self.fsdp_root(), self.optim.optimizer, self.full_weights(path),
                                 load_state(path / "optimizer", kind="optimizer"))
        else:
            self.load_weights(path)
            load_optimizer_state(self.optim.optimizer, path / "optimizer")
        load_scheduler_state(self.optim.scheduler, path / "scheduler")
        load_rng_state(path / "rng", rt.rank)
        self.load_extra_state(state)
        self.optim.load_state_dict(state["optimization"])
        log(f"resumed from {path.name} (step {state['step']})")
        return int(state["step"])


class RunCheckpointer(Checkpointer):
    """Save / resume of an SFT or reward-model run: the trainable parameters of `model` (see the module
    docstring for the layout)."""

    def __init__(self, runtime: Runtime, config: Any, model: nn.Module, optim: Optimization, data_fp: str):
        super().__init__(runtime, config, optim, data_fp)
        self.model = model

    def gather_weights(self) -> dict[str, torch.Tensor]:
        return fsdp.full_trainable_state(self.model)

    def write_weights(self, out: Path, state: dict[str, torch.Tensor] | None) -> None:
        save_file(trainable_state(self.model) if state is None else state, str(out / "trainable.safetensors"))

    def load_weights(self, path: Path) -> None:
        load_trainable_state(self.model, load_file(str(path / "trainable.safetensors")), path)

    def full_weights(self, path: Path) -> dict[str, torch.Tensor]:
        # the optimizer's state is named from the FSDP root (self.optim.model), the weights from self.model
        root = self.fsdp_root()
        prefix = next(f"{n}." if n else "" for n, m in root.named_modules() if m is self.model)
        return {prefix + k: v for k, v in load_file(str(path / "trainable.safetensors")).items()}


def export_model(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, out: str | Path, extra: dict[str, dict] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A plain HF model directory at `out`: LoRA merged into a copy (the trained model is left as it is),
    safetensors weights, the tokenizer, and each `extra` {file name: JSON object} next to them.
    `state_dict`: the full weights gathered from an FSDP2-sharded `model` (ppolm.fsdp.full_state_dict)."""
    out = Path(out)
    if is_lora(model):
        model = copy.deepcopy(model).merge_and_unload()
    with atomic_directory(out) as tmp:  # a crash mid-export never leaves a half-written final/
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            save_json(tmp / name, obj)
    return out


@dataclass
class StepOutput:
    """Metrics of one step and the samples to show (a trainer's step may return this or the metrics alone)."""

    metrics: dict[str, float]
    samples: list[dict]


class LoopTrainer(Protocol):
    """What `train_loop` drives: a trainer with numbered steps, an evaluation and a checkpointer (SFT, RM, PPO)."""

    cfg: Any
    runtime: Runtime
    start_step: int
    total_steps: int
    checkpointer: Any  # .save(step)

    def step(self, step: int) -> dict[str, float] | StepOutput: ...
    def evaluate(self) -> dict[str, float]: ...
    def export_final(self) -> Path | None: ...
    def generating_model(self) -> nn.Module: ...


@contextmanager
def setup_frozen_for_gc() -> Iterator[None]:
    """For the length of a training loop: everything allocated so far (models, optimizer, data) lives for the
    whole run, so it is moved out of the cyclic collector's scans (gc.freeze) and automatic collections stay
    cheap without a per-step gc.collect(). Unfrozen at the end: frozen objects are never collected, so a
    pipeline that runs several stages in one process would otherwise keep every finished trainer's models
    and optimizer state in memory."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def save_or_stop(save: Callable[[int], object], stop: StopSignals, runtime: Runtime, every: int, done: int,
                 total: int) -> None:
    """The end of a loop step (SFT, RM and PPO alike): on SIGTERM/SIGINT save step `done` and raise RunStopped;
    otherwise save every `every` steps. The last step is left to the loop, which always saves it."""
    if stop.requested(runtime) and done < total:
        save(done)
        raise stop.stopped(done)
    if every and done % every == 0 and done < total:
        save(done)


def train_loop(t: LoopTrainer, desc: str, headline: tuple[str, ...], watch: Watch | None = None) -> dict[str, float]:
    """Steps start_step .. total_steps: step, evaluate every cfg.eval_every steps and at the end (when the trainer
    has an evaluation), the task's metric when `watch` says so (and stop when its guard fires), log (and the
    step's samples every cfg.log.samples_every steps), checkpoint every cfg.checkpoint.every steps and at the
    end, then export output_dir/final (rolled back to best/ after a guard stop).
    Returns the last step's metrics (with the final evaluation)."""
    cfg = t.cfg
    logger = MetricsLogger(cfg.output_dir, enabled=t.runtime.is_main, total=t.total_steps, initial=t.start_step,
                           tensorboard=cfg.log.tensorboard, progress=cfg.log.progress, desc=desc)
    last: dict[str, float] = {}
    trip, done = None, t.start_step
    stop = StopSignals().install()
    with setup_frozen_for_gc():
        try:
            if watch is not None and t.start_step == 0 and (origin := watch.start(t.generating_model())) is not None:
                logger.log(0, origin, advance=False)
            eval_every = getattr(cfg, "eval_every", 0)  # PPO has none: its held-out check is the watch's
            for step in range(t.start_step, t.total_steps):
                out = t.step(step)
                metrics, samples = (out.metrics, out.samples) if isinstance(out, StepOutput) else (out, [])
                done = step + 1
                if done == t.total_steps or (eval_every and done % eval_every == 0):
                    t0 = time.perf_counter()
                    evaluation = t.evaluate()
                    if evaluation:  # first: the CLI prints the first few metrics of the result as its headline
                        metrics = {**evaluation, **metrics, "time/eval_s": time.perf_counter() - t0}
                if watch is not None:
                    trip = watch.after_step(done, t.total_steps, t.generating_model, metrics)
                last = metrics
                if done % cfg.log.every == 0 or done == t.total_steps or trip is not None:
                    logger.log(done, metrics, headline)
                if samples and cfg.log.samples_every and done % cfg.log.samples_every == 0:
                    logger.samples(done, samples)
                if trip is not None:
                    break
                save_or_stop(t.checkpointer.save, stop, t.runtime, cfg.checkpoint.every, done, t.total_steps)
            if trip is not None:
                # No checkpoint of the failure: a resume continues from the newest checkpoint at or before
                # the best check (or from the start), not from the step the guard caught.
                if t.runtime.is_main and trip.best_step is not None:
                    t.checkpointer.manager.rewind(trip.best_step)
                t.runtime.wait()
            elif t.start_step < t.total_steps:
                t.checkpointer.save(done)
            else:  # resumed a finished run: nothing to train, but report where it stands
                last = t.evaluate()
            t.export_final()
            if trip is not None:
                watch.rollback(trip)
        finally:
            stop.restore()
            logger.close()
    return last

