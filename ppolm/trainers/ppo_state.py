"""What a PPO checkpoint holds, and resuming from one.

checkpoint-N/ (written crash-safely by CheckpointManager):
  policy/            HF model directory (safetensors; adapter only with LoRA)
  critic.safetensors value head or separate critic weights (absent for critic-free estimators)
  optimizer.*        AdamW state (safetensors + json, no pickle); scheduler.* likewise
  sharded/           instead of policy/, critic.* and optimizer.*: each process's FSDP2 shards of them
                     (checkpoint.sharded; torch.distributed.checkpoint), or the DeepSpeed engine's files
  rng.*, rng-rank<r>.* python / numpy / torch RNG states of each process
  trainer_state.json step, KL controller, reward moments, optimizer counters, data position, fingerprints,
                     micro-batch sizes (as OOM recovery left them)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from ppolm import fsdp
from ppolm.errors import CheckpointError
from ppolm.state_io import load_json
from ppolm.tasks.base import DECODING_FILE, decoding_record
from ppolm.trainers.common import Checkpointer, export_model
from ppolm.trainers.resume import data_fingerprint



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
    micro: Any


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


class PPOCheckpointer(Checkpointer):
    """Save / resume / export for one PPOTrainer: the policy (an HF directory), the value model and the PPO
    state (KL controller, reward moments); the rest is the shared Checkpointer."""

    def __init__(self, trainer: PPOParts):
        super().__init__(trainer.runtime, trainer.cfg, trainer.optim, data_fingerprint(trainer.prompts.texts))
        self.t = trainer

    def fsdp_root(self) -> torch.nn.Module:
        return self.t.actor

    def gather_weights(self) -> dict[str, torch.Tensor]:
        return fsdp.full_state_dict(self.t.actor)  # keys policy.*, and value_head.* or critic.*

    def write_weights(self, out: Path, state: dict[str, torch.Tensor] | None) -> None:
        t = self.t
        if state is None:
            t.actor.policy.save_pretrained(out / "policy", safe_serialization=True)
            critic = _critic_state(t)
        else:
            t.actor.policy.save_pretrained(out / "policy", state_dict=_strip(state, "policy."),
                                           safe_serialization=True)
            critic = _strip(state, _critic_prefix(t)) if t.actor.critic_module() is not None else None
        if critic is not None:
            save_file(critic, str(out / "critic.safetensors"))

    def load_weights(self, path: Path) -> None:
        self._load_policy(path / "policy")
        module = self.t.actor.critic_module()
        if module is not None:
            module.load_state_dict(load_file(str(path / "critic.safetensors")))

    def full_weights(self, path: Path) -> dict[str, torch.Tensor]:
        t = self.t
        model_state = {f"policy.{k}": v for k, v in load_policy_weights(path / "policy").items()}
        if t.actor.critic_module() is not None:
            critic = load_file(str(path / "critic.safetensors"))
            model_state.update({_critic_prefix(t) + k: v for k, v in critic.items()})
        return model_state

    def extra_state(self, step: int) -> dict[str, Any]:
        t = self.t
        return {"kl_controller": t.kl_ctl.state_dict(), "reward_moments": t.scorer.moments.state_dict(),
                "data_position": step * t.global_batch, "micro_batches": t.micro.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.t.kl_ctl.load_state_dict(state["kl_controller"])
        self.t.scorer.moments.load_state_dict(state["reward_moments"])
        if "micro_batches" in state:  # (absent from checkpoints written before OOM recovery existed)
            self.t.micro.load_state_dict(state["micro_batches"])

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
        """output_dir/`name` (final, best): a plain HF model directory (LoRA merged) + tokenizer + the task's
        decoding settings (the ones the held-out checks used)."""
        t = self.t
        state = t.runtime.full_state_dict(t.actor.policy)  # a collective under FSDP2 / ZeRO-3
        if not t.runtime.is_main:
            t.runtime.wait()
            return None
        decoding = decoding_record(t.task.decoding, t.task.system_prompt, task=t.cfg.task.name)
        out = export_model(t.actor.policy, t.tokenizer, Path(t.cfg.output_dir) / name, {DECODING_FILE: decoding},
                           state_dict=state)
        t.runtime.wait()
        return out
