"""Memory planner: the peak memory of a PPO step per process, by component, from model configs only (no weights).

The peak is the sum of what every process holds for the whole run (weights of each model, the gradients at
their largest, AdamW's two moments, the layout's buffers) and the largest of what one phase of a step adds on
top (the rollout's KV cache, or the training forward's saved activations and the LM head's logits), plus the
process's fixed cost (libraries on CPU, where the peak is the resident set) and an allocator margin. Every
coefficient is a measured one: docs/bench.md, "Planned against measured peaks" lists where each comes from and
the predicted-vs-measured table. `ppolm plan` prints it (`ppolm.plan_report`); `gradient_checkpointing: auto`
picks the fastest mode that fits with `choose`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

GiB = 2**30
MODES: tuple[bool | str, ...] = (False, "selective", True)  # fastest first
LAYOUT_KINDS = ("single", "ddp", "fsdp2", "zero2", "zero3")

# Bytes a Llama-style decoder layer (attention + gated MLP) keeps for the backward per token, as
# (per hidden unit, per KV unit, per intermediate unit) for each checkpointing mode and activation precision.
# bf16 autocast, False: the two norms keep their fp32 input and output (16H), the bf16 input casts of q/k/v and
# gate/up (10H), q, the attention output and o_proj's input (6H), k and v (4 KV), gate, SiLU, up and the
# product (8I). selective keeps the matmul and attention outputs (q, k, v, attention, o_proj, down: 8H + 4 KV;
# gate, up: 4I) and the layer's fp32 input (4H). True keeps the layer's fp32 input (4H). In fp32 there are no
# casts, the norms' weighted outputs are the linear inputs (8H) and every saved matmul output takes 4 bytes:
# False 32H + 8 KV + 16I, selective 20H + 8 KV + 8I. Measured by bench/activations.py on the embedded model,
# bytes per token per layer: bf16 30,633 / 14,111 / 2,555 (these give 31,488 / 13,824 / 2,304), fp32
# 44,839 / 25,628 / 2,553 (44,544 / 25,344 / 2,304).
ACT_COEF: dict[tuple[bool | str, bool], tuple[float, float, float]] = {
    (False, True): (32.0, 4.0, 8.0), ("selective", True): (16.0, 4.0, 4.0), (True, True): (4.0, 0.0, 0.0),
    (False, False): (32.0, 8.0, 16.0), ("selective", False): (20.0, 8.0, 8.0), (True, False): (4.0, 0.0, 0.0),
}
LOGIT_CHUNK_ROWS = 512  # ppolm.models.policy.LOGIT_CHUNK_ROWS: response rows of fp32 logits made at once
# Live full-vocabulary fp32 tensors (rows, V) at the LM head's backward: the logits, their softmax and their
# gradient (chunked or not); the forward keeps one (logits for logsumexp's backward) until then.
LOGIT_COPIES_BACKWARD = 3
# On CPU the peak is the process's resident set: the libraries ppolm imports with torch and transformers
# (0.44 GiB measured after `import ppolm.trainers.ppo` and a tokenizer) and glibc's heap, which keeps freed
# blocks (docs/bench.md "Peak memory of a PPO step"). Every training forward makes and frees the same per-layer
# temporaries whatever the checkpointing mode keeps; those under glibc's mmap threshold (up to 32 MiB) come from
# the heap, which then holds about half of what a forward without checkpointing would keep, and at least an
# fp32 copy of the policy's weights (loading a model and copying the reference free that much in blocks under
# the threshold), fitted on the embedded model's steps at 680, 1,256 and 2,536 tokens. With MALLOC_MMAP_THRESHOLD_
# pinned low in the environment freed blocks go back to the system: a fixed remainder. On a GPU neither is in
# the device's memory; the caching allocator reserves whole blocks instead: a margin on the allocated peak
# (to be measured when a GPU is lent).
CPU_LIBRARIES = int(0.44 * GiB)
CPU_HEAP_FRACTION = 0.48
CPU_HEAP_PINNED = int(0.2 * GiB)
GPU_ALLOCATOR_MARGIN = 0.10


@dataclass(frozen=True)
class ModelShape:
    """What the planner reads of a model: parameter counts and the sizes of one decoder layer."""

    params: int
    """All parameters (a tied LM head counted once)."""
    embed_params: int
    """Input embedding (and a tied LM head); kept in fp32 in a bf16 reference."""
    head_params: int
    """An untied LM head's parameters (0 when tied or absent)."""
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    """num_key_value_heads x head_dim: the width of k and of v."""
    vocab: int


@dataclass(frozen=True)
class Layout:
    """How the processes share the work: `kind` one of LAYOUT_KINDS, on `processes` processes."""

    kind: str
    processes: int
    zero3_live: int = 10**9
    """ZeRO-3: elements a process keeps gathered (the smaller of stage3_max_live_parameters and
    stage3_max_reuse_distance; DeepSpeed's default 1e9 each)."""

    @property
    def name(self) -> str:
        return {"single": "1 process", "ddp": "DDP", "fsdp2": "FSDP2", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}[self.kind]


@dataclass(frozen=True)
class Workload:
    """One PPO step as the planner sees it, per process."""

    rows: int
    """Responses generated per step on this process (rollout.batch_size x samples_per_prompt)."""
    micro_rows: int
    """Rows of one training forward (the whole batch with the fused first forward, else a micro-batch)."""
    prompt_tokens: int
    """Longest prompt of a step (left-padded batch width)."""
    response_tokens: int
    amp: bool
    """bf16 autocast (else fp32)."""
    critic: Literal["head", "separate", "none"]
    reference: Literal["copy", "adapters", "none"]
    lora_params: int
    """Trainable LoRA parameters (0: full fine-tuning)."""
    reward_model: ModelShape | None
    device: Literal["cpu", "cuda"]


def linear_params(s: ModelShape) -> int:
    """Parameters of the decoder layers' linear weights: all but the embedding, an untied head and the norms."""
    return s.params - s.embed_params - s.head_params - (2 * s.layers + 1) * s.hidden


def activation_bytes(s: ModelShape, tokens: int, mode: bool | str, amp: bool) -> int:
    """Bytes the training forward over `tokens` (rows x sequence) keeps for its backward in the decoder layers;
    True also counts the one layer the backward recomputes with everything kept."""
    a, b, c = ACT_COEF[(mode, amp)]
    per = a * s.hidden + b * s.kv_dim + c * s.intermediate
    kept = per * tokens * s.layers
    if mode is True:
        f = ACT_COEF[(False, amp)]
        kept += (f[0] * s.hidden + f[1] * s.kv_dim + f[2] * s.intermediate) * tokens
    return int(kept)


def logit_bytes(s: ModelShape, response_rows: int) -> int:
    """Full-vocabulary fp32 tensors at the LM head's backward (chunks of LOGIT_CHUNK_ROWS positions)."""
    return LOGIT_COPIES_BACKWARD * min(response_rows, LOGIT_CHUNK_ROWS) * s.vocab * 4


def kv_cache_bytes(s: ModelShape, rows: int, tokens: int, amp: bool) -> int:
    """The rollout's KV cache at its longest: k and v of every layer for rows x (prompt + response) tokens."""
    return 2 * s.layers * s.kv_dim * rows * tokens * (2 if amp else 4)


def trainable_params(s: ModelShape, w: Workload) -> int:
    """Parameters AdamW updates: the policy (or its adapters), and the critic's."""
    critic = {"head": s.hidden + 1, "separate": s.params - s.head_params, "none": 0}[w.critic]  # (no LM head)
    return (w.lora_params or s.params) + critic


def _sharded(layout: Layout) -> bool:
    return layout.kind in ("fsdp2", "zero3") and layout.processes > 1


def persistent(s: ModelShape, w: Workload, layout: Layout) -> dict[str, int]:
    """What a process holds for the whole run: each model's weights, AdamW's moments and the layout's buffers."""
    n = max(layout.processes, 1)
    shard = n if _sharded(layout) else 1
    fsdp = layout.kind == "fsdp2" and n > 1
    policy = 4 * s.params // shard + (4 * w.lora_params if w.lora_params else 0)
    if w.reference == "copy":
        # linear weights in bf16 under autocast (not under FSDP2, whose units hold one dtype); sharded by FSDP2
        lin = linear_params(s)
        ref = (4 * s.params if not w.amp or fsdp else 4 * (s.params - lin) + 2 * lin) // (n if fsdp else 1)
    else:
        ref = 0
    critic = {"head": 4 * (s.hidden + 1), "separate": 4 * (s.params - s.head_params) // shard, "none": 0}[w.critic]
    rm = 0
    if w.reward_model is not None:
        rm = (2 if w.amp else 4) * w.reward_model.params
    trained = trainable_params(s, w)
    split = n if layout.kind in ("fsdp2", "zero2", "zero3") and n > 1 else 1
    moments = 8 * trained // split
    buffers = 0
    if layout.kind == "ddp" and n > 1:
        buffers = 4 * trained  # the reducer's gradient buckets: a second copy of every gradient
    elif layout.kind in ("zero2", "zero3") and n > 1:
        # DeepSpeed keeps an fp32 copy of this process's partition (even of fp32 weights) and its reduce buckets
        buffers = 4 * trained // n + 2 * 4 * s.hidden * s.hidden
    return {"policy_weights": policy, "reference": ref, "critic": critic, "reward_model": rm,
            "optimizer_moments": moments, "layout_buffers": buffers}


def step_transients(s: ModelShape, w: Workload, layout: Layout, mode: bool | str) -> dict[str, int]:
    """What one phase of a step adds at its peak: gradients, activations and logits of the training forward and
    backward; the KV cache of the rollout (a phase of its own, before any of them)."""
    n = max(layout.processes, 1)
    trained = trainable_params(s, w)
    if layout.kind in ("fsdp2", "zero2", "zero3") and n > 1:
        grads = 4 * trained // n
        # the gradient of one gathered layer (or bucket) exists in full before it is reduced and partitioned
        grads += 4 * (linear_params(s) // max(s.layers, 1) + s.embed_params + s.head_params)
    else:
        grads = 4 * trained
    tokens = w.micro_rows * (w.prompt_tokens + w.response_tokens)
    acts = activation_bytes(s, tokens, mode, w.amp)
    if w.critic == "separate":
        acts += activation_bytes(s, tokens, mode, w.amp)
    logits = logit_bytes(s, w.micro_rows * w.response_tokens)
    gathered = 0
    if _sharded(layout):
        # FSDP2 / ZeRO-3 gather a layer's full weights for its forward and backward (and the next one's ahead);
        # FSDP2 keeps the root unit (embedding, head, final norm) gathered from the forward to the backward, and
        # under bf16 the graph keeps the casts of every gathered layer (ppolm.models.policy.backbone_autocast)
        gathered = 2 * 4 * linear_params(s) // max(s.layers, 1) + 4 * (s.embed_params + s.head_params)
        if layout.kind == "fsdp2" and w.amp:
            gathered += 2 * linear_params(s)
        if layout.kind == "zero3":
            # DeepSpeed releases a gathered weight only past stage3_max_live_parameters / stage3_max_reuse_distance
            # (1e9 elements each by default, which ppolm.zero leaves): a model under that stays gathered from its
            # forward through its backward (Layout.zero3_live)
            gathered = max(gathered, 4 * min(trainable_params(s, w), layout.zero3_live))
    kv = kv_cache_bytes(s, w.rows, w.prompt_tokens + w.response_tokens, w.amp)
    return {"gradients": grads, "activations": acts, "logits": logits, "gathered_weights": gathered,
            "rollout_kv_cache": kv}


def mmap_threshold_pinned() -> bool:
    """Whether glibc's mmap threshold is pinned at <= 1 MiB in this environment (freed blocks then go back)."""
    import os

    value = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
    return value.isdigit() and int(value) <= 2**20


def fixed_costs(s: ModelShape, w: Workload) -> dict[str, int]:
    """The process's cost outside its tensors: libraries and the heap's kept blocks (CPU; none on a GPU)."""
    if w.device != "cpu":
        return {"libraries": 0, "allocator_slack": 0}
    tokens = w.micro_rows * (w.prompt_tokens + w.response_tokens)
    heap = CPU_HEAP_PINNED if mmap_threshold_pinned() else max(
        4 * s.params, int(CPU_HEAP_FRACTION * activation_bytes(s, tokens, False, w.amp)))
    return {"libraries": CPU_LIBRARIES, "allocator_slack": heap}


def peak_of(s: ModelShape, w: Workload, layout: Layout, mode: bool | str) -> tuple[int, dict[str, int]]:
    """(peak bytes per process, every component). The backward's peak is the larger of its start (all the
    activations, the logits' tensors and the head's gradient) and its end (all the gradients, the activations
    freed); the rollout's KV cache is its own phase."""
    if layout.kind == "zero3" and layout.processes > 1 and mode == "selective":
        mode = False  # ppolm.memory: selective checkpointing is off under ZeRO-3 (its gathers inside the layers)
    held = persistent(s, w, layout)
    t = step_transients(s, w, layout, mode)
    head_grad = 4 * (s.embed_params + s.head_params) // (max(layout.processes, 1) if _sharded(layout) else 1)
    train = max(t["activations"] + t["logits"] + head_grad, t["gradients"]) + t["gathered_weights"]
    phase = max(train, t["rollout_kv_cache"])
    fixed = fixed_costs(s, w)
    total = sum(held.values()) + phase + fixed["libraries"] + fixed["allocator_slack"]
    if w.device == "cuda":
        total = int(total * (1 + GPU_ALLOCATOR_MARGIN))
    return total, {**fixed, **held, **t, "train_phase": train}


def choose(s: ModelShape, w: Workload, layout: Layout, budget: int, minibatch_rows: int,
           fused: bool) -> tuple[bool | str, int] | None:
    """The fastest (checkpointing mode, micro-batch rows) whose peak fits `budget` bytes, or None. Speed order:
    the whole minibatch in one micro-batch first (more micro-batches cost a forward pass fewer rows at a time,
    and end the fused first forward), within that False, then 'selective' (a few elementwise passes more),
    then True (one more forward)."""
    for micro in [d for d in range(minibatch_rows, 0, -1) if minibatch_rows % d == 0]:
        rows = w.rows if fused and micro == minibatch_rows else micro
        for mode in MODES:
            if peak_of(s, replace(w, micro_rows=rows), layout, mode)[0] <= budget:
                return mode, micro
    return None
