"""The models of a PPO run: policy, value function (head or separate critic), frozen reference.

The maths needs, per response token, log pi(token), log pi_ref(token) and V(state). `score_tokens` gets
log-probs and values from ONE backbone forward when the critic is a value head; with LoRA the reference is
the same model with its adapters disabled, so no second copy of the weights is held.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ppolm.memory import recast_saved_weights
from ppolm.models.packing import Packed, pack_rows, unpack_responses
from ppolm.ops import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits
from ppolm.rollout import position_ids_from_mask


# Config floats that models read at forward time as a dropout probability (not as nn.Dropout modules): Llama,
# Qwen2, Gemma... pass `attention_dropout` straight to the attention kernel in train mode.
DROPOUT_CONFIG_KEYS = ("attention_dropout", "attn_pdrop", "hidden_dropout", "resid_pdrop", "embd_pdrop",
                       "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout")


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratios assume the same function at rollout (eval) and update (train): dropout off everywhere,
    both nn.Dropout modules and the probabilities that attention layers read from the config or attributes."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    for cfg in configs.values():
        for key in DROPOUT_CONFIG_KEYS:
            if isinstance(getattr(cfg, key, None), float):
                setattr(cfg, key, 0.0)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for key in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, key, None), float):  # attention modules copy the float at init
                setattr(module, key, 0.0)


class ValueHead(nn.Module):
    """Linear map from the last hidden state to a scalar value; bias 0, weights zero by default.

    Why zero and not the N+ RLHF details' normal init (std 1/sqrt(H+1)): a causal LM's last hidden states
    have norms of tens to hundreds, so a normal-initialized head starts with values of several units on
    random tokens. Against a 0/1 outcome reward those values swamp the advantages for the first dozens of
    steps (explained variance -11 on the embedded model) and PPO then moves the policy on noise. With V = 0
    the first advantages are the (whitened) returns -- REINFORCE with a batch-mean baseline -- and the
    critic takes over as it learns; the gradient dV/dw = h is not zero, so the head still trains."""

    def __init__(self, hidden_size: int, init: str = "zero"):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        if init == "zero":
            nn.init.zeros_(self.summary.weight)
        else:
            nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, R, H) -> (B, R) in fp32."""
        return self.summary(hidden.float()).squeeze(-1)

    @torch.no_grad()
    def copy_from(self, score: nn.Linear) -> None:
        """Take the weights of a sequence classifier's one-output score head (a reward model's), bias or not."""
        if score.weight.shape != self.summary.weight.shape:
            raise ValueError(f"a value head of {tuple(self.summary.weight.shape)} cannot start from a score head "
                             f"of {tuple(score.weight.shape)} (a reward model with one output on the same hidden size)")
        self.summary.weight.copy_(score.weight.float())
        self.summary.bias.copy_(score.bias.float() if score.bias is not None else torch.zeros(1))


@dataclass
class TokenScores:
    """Per response token: logprobs (B, R) fp32, values (B, R) fp32 or None, entropy (B, R) or None."""

    logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor | None


def autocast_ctx(dtype: torch.dtype | None, device: torch.device):
    """bf16 autocast for the backbone; a no-op for fp32 runs."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _fsdp_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards (some of) `model`'s weights."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def backbone_autocast(model: nn.Module, dtype: torch.dtype | None, device: torch.device) -> Iterator[None]:
    """`autocast_ctx` for a forward that may be followed by a backward: with grad, the bf16 casts of the weights
    are neither cached for the forward nor saved for the backward, which recasts them (`recast_saved_weights`:
    same bits, 0.21 GB less at the peak on the embedded model). Not under FSDP2: its weights are freed after the
    forward and regathered for the backward, so the graph keeps the casts it saved."""
    if dtype is None or not torch.is_grad_enabled() or _fsdp_sharded(model):
        with autocast_ctx(dtype, device):
            yield
        return
    with torch.autocast(device.type, dtype=dtype, cache_enabled=False), recast_saved_weights():
        yield


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The decoder stack of a causal LM (the model without its LM head), to be called directly for hidden states,
    or None where that is not safe: under FSDP2 (the root module's hooks gather the embeddings, the final norm and
    the head) and DeepSpeed ZeRO-3 (the head's weight is partitioned), or where the model names no decoder."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or hasattr(head.weight, "ds_id") or _fsdp_sharded(model):
        return None
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else None


def last_hidden(model: nn.Module, **inputs) -> torch.Tensor:
    """Last-layer hidden states (after the final norm) of a forward without KV cache -> (B, T, H).

    The decoder stack is called directly where `decoder_of` allows: the CausalLM forward would also run its LM
    head (on one position with logits_to_keep=1, but under autocast it first casts the whole (V, H) head weight
    to bf16: 113 MB read and a fresh 57 MB written on the embedded model, at every forward). Elsewhere the full
    forward, whose hidden_states[-1] is the same tensor."""
    decoder = decoder_of(model)
    if decoder is not None:
        return decoder(**inputs, use_cache=False).last_hidden_state
    return model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states[-1]


def response_hidden(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, R: int
) -> torch.Tensor:
    """Last-layer hidden states at the R positions that predict the response tokens. -> (B, R, H).

    The full-vocabulary projection is not run inside the model (`last_hidden`): we apply it ourselves, in fp32,
    only where it is needed.
    """
    hidden = last_hidden(model, input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask))
    return hidden[:, -R - 1 : -1]


def packed_response_hidden(model: PreTrainedModel, packed: Packed) -> torch.Tensor:
    """`response_hidden` of packed rows (ppolm.models.packing): one forward over their real tokens, no attention
    mask (transformers builds the per-row block mask from the restarting position ids), the rows' varlen offsets
    (flash attention, `varlen_sdpa_attention`), no KV cache (with one, transformers would not look for packed
    rows). -> (M, H) at the M real response tokens."""
    hidden = last_hidden(model, input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                         **packed.attention_kwargs())
    return hidden[0, packed.predict_index]


def final_logit_transform(config, logits: torch.Tensor) -> torch.Tensor:
    """What some architectures do to the LM head's output inside their own forward (so the sampler sees it):
    logit scaling (Cohere `logit_scale`: x * s; Granite `logits_scaling`: x / s) and final-logit softcapping
    (Gemma-2/3 `final_logit_softcapping`: c * tanh(x / c)). Scoring must apply the same, in the same order."""
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text_cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    scaling = getattr(text_cfg, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        logits = logits / scaling
    cap = getattr(text_cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _full(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 root is resharded after a no-grad forward (reference, old log-probs): gather the head for it.
    With grad the root stays unsharded until backward, so the weight is a plain tensor and its gradient
    flows through FSDP's own reduce-scatter."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def lm_logits_fp32(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head in fp32 outside autocast: log-probs and ratios must not carry bf16 rounding. The model's own
    final-logit transforms (scaling, softcapping) are applied, so these are the logits the sampler saw."""
    head = model.get_output_embeddings()
    with torch.autocast(hidden.device.type, enabled=False):
        if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3: the head's own forward gathers its partitioned
            # weight and hands its gradient to ZeRO (the weights are fp32 there: DeepSpeed runs refuse bf16/fp16)
            return final_logit_transform(model.config, head(hidden.float()))
        weight = _full(head.weight).float()
        bias = _full(head.bias).float() if getattr(head, "bias", None) is not None else None
        # One (N, H) x (H, V) product: given a sliced (B, R, H) input and a weight without grad (the frozen
        # reference), F.linear would not fold the batch dimensions and would run a batched product against the
        # weight expanded B times (the same numbers here, but 1.7x slower at 8 x 24 rows of the embedded model, one
        # thread)
        flat = nn.functional.linear(hidden.float().reshape(-1, hidden.shape[-1]), weight, bias)
        return final_logit_transform(model.config, flat.reshape(*hidden.shape[:-1], -1))


def score_tokens(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_ids: torch.Tensor,
    *,
    value_head: ValueHead | None = None,
    need_entropy: bool = False,
    autocast_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
    entropy_grad: bool = True,
    packed: bool = False,
) -> TokenScores:
    """log pi(response token) for each response position, and V from `value_head` on the same forward.

    input_ids, attention_mask (B, T) with the response in the last R = response_ids.shape[1] positions.
    temperature: the sampling temperature; logits / temperature make these the log-probs of the policy that
    sampled (N+ implementation details, "scale the logits by the sampling temperature").
    entropy_grad: False when the entropy is only a metric (no entropy bonus): it is computed from detached logits
    (same values), so its full-vocabulary softmax is not kept for a backward that never uses it.
    packed: run the forward on the rows' real tokens only (ppolm.models.packing) and the LM head and value head on
    the real response tokens only; the same numbers at those positions within float rounding, 0 at the padded
    ones (which every loss and metric masks out).
    """
    R = response_ids.shape[1]
    if packed:
        p = pack_rows(input_ids, attention_mask, R)
        with backbone_autocast(model, autocast_dtype, input_ids.device):
            hidden = packed_response_hidden(model, p)
        logprobs, entropy = token_logprobs(model, hidden, response_ids[p.rows, p.cols], temperature, need_entropy,
                                           entropy_grad)
        grid = lambda x: unpack_responses(x, p) if x is not None else None  # noqa: E731
        return TokenScores(grid(logprobs), grid(value_head(hidden) if value_head is not None else None),
                           grid(entropy))
    with backbone_autocast(model, autocast_dtype, input_ids.device):
        hidden = response_hidden(model, input_ids, attention_mask, R)
    logprobs, entropy = token_logprobs(model, hidden, response_ids, temperature, need_entropy, entropy_grad)
    values = value_head(hidden) if value_head is not None else None
    return TokenScores(logprobs, values, entropy)


# Rows of full-vocabulary fp32 logits made at once (512 x 49,152 x 4 bytes = 100 MB on the embedded model).
LOGIT_CHUNK_ROWS = 512


def token_logprobs(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    need_entropy: bool = False,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(label) and optionally the entropy per position from last-layer hidden states: hidden (..., H),
    labels (...) -> two (...) fp32 tensors (entropy None unless need_entropy).

    Up to LOGIT_CHUNK_ROWS positions: one fp32 LM-head projection. More (long responses, SFT batches): chunks of
    that many rows, each checkpointed, so neither the forward nor the backward ever holds more than one chunk's
    (rows, V) logits, softmax and gradient (at 8 x 256 response tokens: 0.4 GB each instead of 100 MB); the
    backward recomputes each chunk's projection (one more LM-head matmul). Same maths; the LM head's gradient is
    then summed chunk by chunk (fp32 rounding-level differences from the one-matmul sum). Not under FSDP2 or
    DeepSpeed ZeRO-3 (one projection there)."""
    shape, H = labels.shape, hidden.shape[-1]
    if (labels.numel() <= LOGIT_CHUNK_ROWS or hasattr(model.get_output_embeddings().weight, "ds_id")
            or _fsdp_sharded(model)):
        # (ZeRO-3's head module gathers its partitioned weight in its own forward, FSDP2 regathers a resharded
        # root: one projection there, not a recompute inside the backward that no test has run)
        return _chunk_scores(model, hidden, labels, temperature, need_entropy, entropy_grad)
    from torch.utils.checkpoint import checkpoint

    outs = []
    for h, y in zip(hidden.reshape(-1, H).split(LOGIT_CHUNK_ROWS), labels.reshape(-1).split(LOGIT_CHUNK_ROWS)):
        args = (model, h, y, temperature, need_entropy, entropy_grad)
        outs.append(checkpoint(_chunk_scores, *args, use_reentrant=False) if torch.is_grad_enabled()
                    else _chunk_scores(*args))
    logprobs = torch.cat([lp for lp, _ in outs]).reshape(shape)
    entropy = torch.cat([e for _, e in outs]).reshape(shape) if need_entropy else None
    return logprobs, entropy


def _chunk_scores(model, hidden, labels, temperature, need_entropy, entropy_grad):
    logits = lm_logits_fp32(model, hidden)
    if temperature != 1.0:
        logits = logits / temperature
    if logits.requires_grad:  # a pass with a backward: one fused pass, cheaper backward (docs/bench.md)
        logprobs, entropy = logprobs_and_entropy(logits, labels, need_entropy and entropy_grad)
        return logprobs, entropy if need_entropy else None
    logprobs = logprobs_from_logits(logits, labels)
    entropy = entropy_from_logits(logits) if need_entropy else None  # (no grad here)
    return logprobs, entropy


class SeparateCritic(nn.Module):
    """A value model with its own backbone (a copy of the policy or of the reward model) and a value head.

    The backbone is the bare transformer (`model.base_model`), without the LM or score head: such a head would
    never get a gradient, which DDP rejects as unused parameters when embeddings are untied.
    """

    def __init__(self, backbone: PreTrainedModel, head: ValueHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, R: int, autocast_dtype: torch.dtype | None,
        packed: bool = False,
    ) -> torch.Tensor:
        """V for the R response positions, (B, R) fp32 (packed: from a packed forward, 0 at padded positions)."""
        if packed:
            p = pack_rows(input_ids, attention_mask, R)
            with backbone_autocast(self.backbone, autocast_dtype, input_ids.device):
                out = self.backbone(input_ids=p.input_ids, position_ids=p.position_ids, attention_mask=None,
                                    use_cache=False, **p.attention_kwargs())
            return unpack_responses(self.head(out.last_hidden_state[0, p.predict_index]), p)
        with backbone_autocast(self.backbone, autocast_dtype, input_ids.device):
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return self.head(out.last_hidden_state[:, -R - 1: -1])


def hidden_size(model: PreTrainedModel) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))


def frozen_copy(model: PreTrainedModel, matmul_dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A frozen reference copy in the policy's own dtype. Not cast wholesale to bf16 in bf16 runs: the policy
    keeps fp32 master weights under autocast, and a bf16 copy would give KL != 0 at step 0 (norms, embeddings
    and the fp32 LM head would read rounded weights).

    matmul_dtype (the run's autocast dtype): the weights of the backbone's linear layers are stored in it. Autocast
    casts them to that dtype before every matmul anyway, and rounding is deterministic, so the reference's
    forward is bit-identical to the policy's at step 0 while those weights take half the memory (0.21 GB on the
    embedded model). The LM head (fp32 logits), embeddings and norms keep the policy's dtype. Only for a
    reference that always runs under that autocast."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    if matmul_dtype is not None:
        head = ref.get_output_embeddings()
        for m in ref.modules():
            if isinstance(m, nn.Linear) and m is not head and m.weight is not getattr(head, "weight", None):
                m.to(matmul_dtype)
    return ref


def apply_lora(model: PreTrainedModel, r: int, alpha: float, dropout: float, target_modules) -> PreTrainedModel:
    """Wrap `model` with peft LoRA adapters; only adapter weights train."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


@contextlib.contextmanager
def lora_merged_for_generation(model: nn.Module, dtype: torch.dtype | None = None):
    """While generating, decode with the policy that is scored and trained, at the cost of one matmul per layer.

    fp32 (dtype None or fp32): each LoRA linear layer's base weight becomes W + scale * B @ A (a new tensor; W
    itself is kept) and the adapters are disabled, so a decode step runs one matmul per layer instead of three
    (the unmerged LoRA decode was 2.1x slower than the full model's on the embedded model, docs/bench.md); the
    merged forward equals the adapters' to fp32 rounding (2e-8 nats of KL per token).
    bf16/fp16 (the autocast dtype): W is cast to it once and the adapters stay on. Merging there would round
    W + d to bf16, and a young adapter's d is below half a bf16 ulp of W: the rollout then sampled from the base
    model (KL 0.0021 nats per token from the scored policy against the 6e-6 the adapters had learned,
    docs/results.md), so the samples did not carry what the update had learned. Casting once keeps the saving
    that matters (autocast caches casts only for weights that require grad, so frozen base weights were cast
    again at every decode step) and gives the scored policy's numbers: bf16(W) x + scale * B A x.
    On exit the original W tensors come back untouched: unlike peft's merge/unmerge (W + d - d), no rounding drift
    reaches the base weights, which are the reference and are not checkpointed, so resume stays bit-exact.
    Models without LoRA, or with LoRA layers other than plain linear ones (DoRA, LoRA bias, embeddings), are
    left as they are."""
    if not hasattr(model, "disable_adapter"):  # not a peft model (and peft is not imported for it)
        yield
        return
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    plain = bool(layers) and all(
        type(m) is LoraLinear and not m.merged and not any(m.use_dora.values()) and not any(m.lora_bias.values())
        for m in layers)
    if not plain:
        yield
        return
    merge = dtype is None or dtype == torch.float32
    kept = []
    try:
        with torch.no_grad():
            for m in layers:
                weight = m.get_base_layer().weight
                kept.append((weight, weight.data))
                if merge:
                    delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
                    weight.data = (weight.data + delta.to(weight.dtype)).to(dtype or weight.dtype)
                else:
                    weight.data = weight.data.to(dtype)
        if merge:
            with model.disable_adapter():
                yield
        else:
            yield
    finally:
        for weight, data in kept:
            weight.data = data
