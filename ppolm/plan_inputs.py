"""What the memory planner reads: model shapes from configs (a model built on the meta device: no weights), the
process layout from an accelerate file or the running launch, the step from a PPO config, the memory budget
(`--memory 24GiB`, or what this process and device have available)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from ppolm.errors import ConfigError
from ppolm.plan import Layout, ModelShape, Workload

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'24GiB', '500MiB', '1.5GB', '123456' (bytes) -> bytes. ConfigError on anything else."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS:
        raise ConfigError(f"--memory '{text}': expected a size such as 24GiB, 500MiB, 1.5GB or a number of bytes")
    value = int(float(m.group(1)) * UNITS[unit])
    if value <= 0:
        raise ConfigError(f"--memory '{text}': must be more than 0 bytes")
    return value


def _model_config(name: str, trust_remote_code: bool):
    from transformers import AutoConfig

    from ppolm.models.load import ensure_embedded, resolve
    from ppolm.models.tiny import TINY_CONFIGS, byte_tokenizer

    src = resolve(name)
    if src.kind == "tiny":
        tok = byte_tokenizer()
        return TINY_CONFIGS[src.name](len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      bos_token_id=None)
    path = str(ensure_embedded()) if src.kind == "embedded" else src.path
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                          local_files_only=src.kind != "hub"
                                          or os.environ.get("PPOLM_ALLOW_DOWNLOAD", "0") != "1")
    except (OSError, ValueError) as exc:
        from ppolm.errors import ModelLoadError

        raise ModelLoadError(f"model '{name}': {str(exc).strip().splitlines()[0]}") from None


def model_shape(name: str, *, kind: str = "causal", trust_remote_code: bool = False) -> ModelShape:
    """The shape of model `name` (kind 'causal' or 'seqcls'), from its config: the model is built on the meta
    device, so parameter counts are exact for any architecture and no weight is read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _model_config(name, trust_remote_code)
    if kind == "seqcls":
        config.num_labels = 1
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings() if kind == "causal" else None
    head_params = 0 if head is None or head.weight is emb else head.weight.numel()
    hidden = int(getattr(text, "hidden_size", None) or text.n_embd)
    heads = int(getattr(text, "num_attention_heads", None) or text.n_head)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    inter = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden)
    layers = int(getattr(text, "num_hidden_layers", None) or text.n_layer)
    return ModelShape(params=sum(p.numel() for p in model.parameters()), embed_params=emb.numel(),
                      head_params=head_params, layers=layers, hidden=hidden, intermediate=inter,
                      kv_dim=kv_heads * head_dim, vocab=emb.shape[0])


def layout_from_file(path: str | Path | None) -> Layout:
    """The layout an accelerate config file launches (None: one process)."""
    if path is None:
        return Layout("single", 1)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--launch {path}: cannot read it ({exc})") from None
    n = int(data.get("num_processes", 1))
    kind = data.get("distributed_type", "NO")
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        user = _deepspeed_json(ds.get("deepspeed_config_file"))
        stage = int(user.get("stage", ds.get("zero_stage", 2)))
        return Layout("zero3" if stage == 3 else "zero2", n, zero3_live(user))
    if kind == "FSDP":
        return Layout("fsdp2", n)
    return Layout("ddp" if n > 1 else "single", n)


def _deepspeed_json(path: str | None) -> dict:
    """The zero_optimization section of a DeepSpeed JSON named by an accelerate file ({} when none)."""
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("zero_optimization", {})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"deepspeed_config_file {path}: cannot read it ({exc})") from None


def zero3_live(zero: dict) -> int:
    """Elements ZeRO-3 keeps gathered: the smaller of stage3_max_live_parameters and stage3_max_reuse_distance
    (DeepSpeed's defaults: 1e9 each)."""
    return int(min(float(zero.get("stage3_max_live_parameters", 1e9)),
                   float(zero.get("stage3_max_reuse_distance", 1e9))))


def layout_of_launch(world_size: int) -> Layout:
    """The layout of the running launch (accelerate's environment), for `gradient_checkpointing: auto`."""
    from ppolm import zero
    from ppolm.fsdp import fsdp_requested

    if world_size <= 1:
        return Layout("single", 1)
    if zero.deepspeed_requested():
        live = zero3_live(zero.user_config().get("zero_optimization", {}))
        return Layout("zero3" if zero.zero_stage() == 3 else "zero2", world_size, live)
    return Layout("fsdp2" if fsdp_requested() else "ddp", world_size)


def lora_params(s: ModelShape, r: int, enabled: bool) -> int:
    """LoRA adapters on every linear layer of the decoder (peft's 'all-linear'): r x (in + out) each; 7 per
    Llama-style layer (q, k, v, o: H in or out; gate, up, down: H and I)."""
    if not enabled:
        return 0
    per_layer = r * (2 * s.hidden + 2 * (s.hidden + s.kv_dim) + 2 * s.hidden + 3 * (s.hidden + s.intermediate))
    return per_layer * s.layers


def fused_first_forward(cfg) -> bool:
    """Whether PPO config `cfg`'s training forward is the fused first forward over the whole batch (as
    PPOTrainer.fused_first_forward decides): one epoch of one minibatch without accumulation."""
    p, r = cfg.ppo, cfg.rollout
    return (p.fuse_first_forward and p.epochs == 1 and p.grad_accum_steps == 1
            and p.minibatch_size == r.batch_size * r.samples_per_prompt)


def workload(cfg, shape: ModelShape, prompt_tokens: int, device: str, amp: bool,
             reward_shape: ModelShape | None) -> Workload:
    """The step of PPO config `cfg` (a PPORunConfig) per process."""
    from ppolm.algo.estimators import get_estimator

    r, p = cfg.rollout, cfg.ppo
    rows = r.batch_size * r.samples_per_prompt
    fused = fused_first_forward(cfg)
    critic = cfg.critic.kind if get_estimator(cfg.algo.estimator).needs_critic else "none"
    kl_needed = cfg.kl.coef > 0 or cfg.kl.adaptive
    reference = "adapters" if cfg.lora.enabled else ("copy" if kl_needed else "none")
    return Workload(rows=rows, micro_rows=rows if fused else p.minibatch_size // p.grad_accum_steps,
                    prompt_tokens=prompt_tokens, response_tokens=r.max_new_tokens, amp=amp, critic=critic,
                    reference=reference, lora_params=lora_params(shape, cfg.lora.r, cfg.lora.enabled),
                    reward_model=reward_shape, device=device)


def longest_prompt(cfg) -> int:
    """Tokens of the longest prompt of PPO config `cfg`'s training data (chat template included): the width of
    the widest step. Reads the data and the tokenizer, no weights."""
    from ppolm.models import load_tokenizer
    from ppolm.tasks import build_task
    from ppolm.trainers.common import split_held_out
    from ppolm.trainers.prompts import build_prompts

    task = build_task(cfg.task.name, cfg.task.options)
    examples = task.load_all(cfg.task.data)
    if cfg.eval.every and cfg.task.eval_data is None:
        examples, _ = split_held_out(examples, cfg.task.eval_fraction, cfg.seed)
    prompts = build_prompts(examples[: cfg.task.limit], load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code),
                            system_prompt=task.system_prompt, use_chat_template=cfg.rollout.use_chat_template,
                            max_prompt_tokens=cfg.rollout.max_prompt_tokens)
    return max((len(t) for t in prompts.token_ids), default=cfg.rollout.max_prompt_tokens)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory(device_type: str, local_processes: int = 1) -> int | None:
    """Bytes one process may use: on a GPU the device's free memory; on CPU what the host has available
    (/proc/meminfo MemAvailable, within a cgroup limit) plus what this process already holds, shared by the
    processes of this host. None where it cannot be read."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    try:
        info = Path("/proc/meminfo").read_text()
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    avail = int(re.search(r"MemAvailable:\s+(\d+)", info).group(1)) * 1024
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        avail = min(avail, limit - used)
    own = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024
    return (avail + own * local_processes) // max(local_processes, 1)
