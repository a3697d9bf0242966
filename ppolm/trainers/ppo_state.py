"""What a PPO checkpoint holds, and resuming from one.

checkpoint-N/ (written crash-safely by CheckpointManager):
  policy/            HF model directory (safetensors; adapter only with LoRA)
  critic.safetensors value head or separate critic weights (absent for critic-free estimators)
  optimizer.*        AdamW state (safetensors + json, no pickle); scheduler.* likewise
  sharded/           instead of policy/, critic.* and optimizer.*: each process's FSDP2 shards of them
                     (checkpoint.sharded; torch.distributed.checkpoint), or the DeepSpeed engine's files
  rng.*, rng-rank<r>.* python / numpy / torch RNG states of each process
  trainer_state.json step, KL controller, reward moments, optimizer counters, data position, fingerprints
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from ppolm import fsdp
from ppolm.checkpoint import CheckpointManager
from ppolm.errors import CheckpointError
from ppolm.trainers.common import SHARDED, export_model, load_shards, save_with_shards, writes_shards
from ppolm.trainers.resume import check_same_run, config_fingerprint, data_fingerprint
from ppolm.state_io import (
    get_rng_state, load_json, load_optimizer_state, load_rng_state, load_scheduler_state, save_json,
    save_optimizer_state, save_rng_state, save_scheduler_state, save_state, load_state,
)



class PPOParts(Protocol):
    """What a checkpoint reads from a PPO trainer (a Protocol, so this module never imports the trainer)."""

    cfg: Any
    actor: Any
    optim: Any
    kl_ctl: Any
    scorer: Any
    runtime: Any
    prompts: Any
    tokenizer: Any
    task: Any
    global_batch: int


def load_policy_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights save_pretrained wrote: model.safetensors, or the shards listed in its index (large models
    are saved as model-0000i-of-0000n.safetensors + model.safetensors.index.json)."""
    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        raise CheckpointError(f"{directory}: no model.safetensors nor model.safetensors.index.json")
    shards = sorted(set(load_json(index)["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(directory / shard)))
    return state


def _critic_state(trainer: PPOParts) -> dict[str, torch.Tensor] | None:
    """The value model's weights; None for a critic-free estimator (no critic.safetensors is written)."""
    module = trainer.actor.critic_module()
    if module is None:
        return None
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def _critic_prefix(trainer: PPOParts) -> str:
    return "value_head." if trainer.actor.value_head is not None else "critic."


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class PPOCheckpointer:
    """Save / resume / export for one PPOTrainer."""

    def __init__(self, trainer: PPOParts):
        self.t = trainer
        self.manager = CheckpointManager(trainer.cfg.output_dir, keep=trainer.cfg.checkpoint.keep)

    def _write(self, step: int, out: Path, rng_states: list | None = None, full: tuple | None = None,
               sharded: bool = False) -> None:
        t = self.t
        policy = t.actor.policy
        # sharded: the weights and optimizer state are already in out/sharded
        if full is not None:  # FSDP2: the full states every process gathered (same files as one process writes)
            model_state, optimizer_state = full
            policy.save_pretrained(out / "policy", state_dict=_strip(model_state, "policy."), safe_serialization=True)
            if t.actor.critic_module() is not None:
                save_file(_strip(model_state, _critic_prefix(t)), str(out / "critic.safetensors"))
            save_state(optimizer_state, out / "optimizer", kind="optimizer")
        elif not sharded:
            policy.save_pretrained(out / "policy", safe_serialization=True)
            critic = _critic_state(t)
            if critic is not None:
                save_file(critic, str(out / "critic.safetensors"))
            save_optimizer_state(t.optim.optimizer, out / "optimizer")
        save_scheduler_state(t.optim.scheduler, out / "scheduler")
        save_rng_state(out / "rng", rng_states)
        save_json(out / "trainer_state.json", {
            "step": step,
            "kl_controller": t.kl_ctl.state_dict(),
            "reward_moments": t.scorer.moments.state_dict(),
            "optimization": t.optim.state_dict(),
            "data_position": step * t.global_batch,
            "world_size": t.runtime.world_size,
            "config": config_fingerprint(t.cfg),
            "data": data_fingerprint(t.prompts.texts),
        })

    def save(self, step: int) -> Path | None:
        """Main process writes checkpoint-`step`; every process waits for it."""
        path = None
        t = self.t
        rng_states = t.runtime.gather_object(get_rng_state())  # every rank's streams, written by the main one
        if writes_shards(t.runtime, t.cfg.checkpoint.sharded):  # (t.optim.model: the engine under DeepSpeed)
            return save_with_shards(t.runtime, self.manager, step, t.optim.model, t.optim.optimizer,
                                    lambda out: self._write(step, out, rng_states, sharded=True))
        full = ((fsdp.full_state_dict(t.actor), fsdp.full_optimizer_state(t.actor, t.optim.optimizer))
                if t.runtime.fsdp else None)
        if t.runtime.is_main:
            path = self.manager.save(step, lambda out: self._write(step, out, rng_states, full))
        self.t.runtime.wait()
        return path

    def maybe_resume(self) -> int:
        """Load the latest valid checkpoint; returns the step to continue from (0 when none)."""
        t = self.t
        log = print if t.runtime.is_main else (lambda _msg: None)
        path = self.manager.latest_valid(log=log)
        if path is None:
            return 0
        state = load_json(path / "trainer_state.json")
        self._check_same_run(state, path)
        if (path / SHARDED).is_dir():
            load_shards(t.runtime, path, t.optim.model, t.optim.optimizer)
        elif t.runtime.fsdp:
            model_state = {f"policy.{k}": v for k, v in load_policy_weights(path / "policy").items()}
            if t.actor.critic_module() is not None:
                critic = load_file(str(path / "critic.safetensors"))
                model_state.update({_critic_prefix(t) + k: v for k, v in critic.items()})
            fsdp.load_full_state(t.actor, t.optim.optimizer, model_state,
                                 load_state(path / "optimizer", kind="optimizer"))
        else:
            self._load_policy(path / "policy")
            module = t.actor.critic_module()
            if module is not None:
                module.load_state_dict(load_file(str(path / "critic.safetensors")))
            load_optimizer_state(t.optim.optimizer, path / "optimizer")
        load_scheduler_state(t.optim.scheduler, path / "scheduler")
        load_rng_state(path / "rng", t.runtime.rank)
        t.kl_ctl.load_state_dict(state["kl_controller"])
        t.scorer.moments.load_state_dict(state["reward_moments"])
        t.optim.load_state_dict(state["optimization"])
        log(f"resumed from {path.name} (step {state['step']})")
        return int(state["step"])

    def _check_same_run(self, state: dict, path: Path) -> None:
        t = self.t
        check_same_run(state, path, config=t.cfg, data_fp=data_fingerprint(t.prompts.texts),
                       world_size=t.runtime.world_size, allow_changed=t.cfg.allow_changed_resume,
                       is_main=t.runtime.is_main)

    def _load_policy(self, directory: Path) -> None:
        policy = self.t.actor.policy
        if self.t.actor.is_lora():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(policy, load_file(str(directory / "adapter_model.safetensors")))
            return
        state = load_policy_weights(directory)
        missing, unexpected = policy.load_state_dict(state, strict=False)
        tied = set(getattr(policy, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise CheckpointError(f"{directory}: weights do not match the model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")

    def export_final(self, name: str = "final") -> Path | None:
        """output_dir/`name` (final, best): a plain HF model directory (LoRA merged) + tokenizer + decoding."""
        t = self.t
        state = t.runtime.full_state_dict(t.actor.policy)  # a collective under FSDP2 / ZeRO-3
        if not t.runtime.is_main:
            t.runtime.wait()
            return None
        r, d = t.cfg.rollout, t.task.decoding
        out = export_model(t.actor.policy, t.tokenizer, Path(t.cfg.output_dir) / name, {"ppolm_decoding.json": {
            "temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
            "max_new_tokens": r.max_new_tokens, "stop": list(r.stop or d.stop),
            "system_prompt": t.task.system_prompt, "task": t.cfg.task.name,
        }}, state_dict=state)
        t.runtime.wait()
        return out
