"""Packed sequences: the real tokens of a padded batch laid end to end, attention kept within each row.

A PPO batch is B rows of a left-padded prompt followed by a right-padded response (ppolm.types.Rollout): row b's
real tokens are one contiguous run of its (B, T) grid. With prompts and responses of very different lengths much
of that grid is padding, which a padded forward computes anyway. Packed, the forward sees only the real tokens:
one sequence of N = sum of the row lengths, position ids restarting at 0 on each row (the positions the padded
path gives them: cumsum of the mask - 1), and no 2D attention mask. transformers (5.x, `masking_utils.
find_packed_sequence_indices`) then reads the row boundaries from the position ids and builds a block-diagonal
causal mask for sdpa and eager attention: a token never attends to another row. Only for models whose code builds
its mask with `masking_utils.create_causal_mask` (`supports_packing`), and only without a KV cache
(`use_cache=False`: with a cache transformers assumes one sequence per row).

A dense block mask still computes every query against every key of the packed sequence (N^2, where the padded
batch computed B x T^2), which at 16 rows of ~150 tokens costs more than the padding it removes. So the forward
also passes the rows' offsets as transformers' varlen keyword arguments (`cu_seq_lens_q/k`, `max_length_q/k`, as
`DataCollatorWithFlattening` makes them): flash-attention kernels read them natively (transformers'
`_flash_attention_forward`), and for sdpa, the CPU default, `use_varlen_attention` switches the model to
`varlen_sdpa_attention`, registered with transformers' `AttentionInterface`: the same sdpa kernel, causal, once per
row (sum of L_b^2, no cross-row work), and transformers' own sdpa for every call without those arguments
(generation, evaluation: unchanged).

Micro-batches of the packed passes are sized by tokens, not rows (`token_budget_batches`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Packed:
    """B padded rows as one packed sequence, and where their response tokens go back.

    input_ids      (1, N) long  the real tokens of rows 0..B-1, in order
    position_ids   (1, N) long  each token's position within its own row (0 at each row's first token)
    predict_index  (M,)   long  index in the N tokens of the hidden state that predicts each of the M real
                                response tokens (token t predicts token t + 1 of the same row)
    rows, cols     (M,)   long  where those M tokens sit in the (B, R) response grid
    cu_seqlens     (B+1,) int32 offsets of the rows in the N tokens (row b: [cu_seqlens[b], cu_seqlens[b+1]))
    B, R           the response grid's shape; max_len: the longest row
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    predict_index: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    cu_seqlens: torch.Tensor
    B: int
    R: int
    max_len: int

    def attention_kwargs(self) -> dict:
        """transformers' varlen keyword arguments for these rows (what flash-attention kernels and
        `varlen_sdpa_attention` read)."""
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_len, "max_length_k": self.max_len}


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, R: int) -> Packed:
    """input_ids, attention_mask (B, T), the response in the last R columns -> Packed.

    Each row's real tokens (mask 1) must be contiguous, as in a rollout (left-padded prompt, right-padded
    response), and a row with a response token must have at least one prompt token before it (the padded path
    predicts response token 0 from the column before it as well).
    """
    mask = attention_mask.bool()
    B, T = mask.shape
    lengths = mask.sum(-1)
    positions = mask.long().cumsum(-1) - 1  # position of each real token within its row
    starts = lengths.cumsum(0) - lengths  # flat index of each row's first token
    rows, cols = mask[:, T - R:].nonzero(as_tuple=True)
    own = positions[rows, T - R + cols]  # the response token's position in its row
    if bool((own < 1).any()):
        raise ValueError("pack_rows: a response token with no token before it in its row (an empty prompt)")
    return Packed(
        input_ids=input_ids[mask].unsqueeze(0), position_ids=positions[mask].unsqueeze(0),
        predict_index=starts[rows] + own - 1, rows=rows, cols=cols,
        cu_seqlens=torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32), B=B, R=R,
        max_len=int(lengths.max()) if B else 0,
    )


def unpack_responses(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """(M, ...) values of the packed response tokens -> (B, R, ...) grid, 0 at padded positions. Differentiable:
    the gradient of each packed entry is that of its grid cell (padded cells get none, as the masked losses
    give them none in the padded path)."""
    out = x.new_zeros((packed.B, packed.R, *x.shape[1:]))
    return out.index_put((packed.rows, packed.cols), x)


def token_budget_batches(lengths: torch.Tensor, max_tokens: int) -> list[slice]:
    """Split rows 0..B-1 into consecutive micro-batches whose token counts (lengths (B,), real tokens per row)
    sum to at most max_tokens each; a row longer than max_tokens is a micro-batch alone. Greedy in row order:
    every row is in exactly one micro-batch, and the k rows of a group stay next to each other. -> slices."""
    batches: list[slice] = []
    start, used = 0, 0
    for row, n in enumerate(lengths.tolist()):
        if row > start and used + n > max_tokens:
            batches.append(slice(start, row))
            start, used = row, 0
        used += n
    if lengths.numel():
        batches.append(slice(start, lengths.numel()))
    return batches


def supports_packing(model: nn.Module) -> bool:
    """Whether `model`'s modeling code builds its attention mask with transformers' `create_causal_mask`, which
    detects packed rows from the position ids (the module of every transformers model class is looked at, so
    peft wrappers and bare backbones are seen through)."""
    from transformers import PreTrainedModel

    found = [sys.modules.get(type(m).__module__) for m in model.modules() if isinstance(m, PreTrainedModel)
             and type(m).__module__.startswith("transformers.models.")]
    return bool(found) and all(hasattr(mod, "create_causal_mask") for mod in found)


def require_packing(model: nn.Module) -> None:
    """Refuse (ConfigError, one line) packed micro-batches for a model whose code would not keep attention within
    each packed row (`supports_packing`)."""
    if not supports_packing(model):
        from ppolm.errors import ConfigError

        names = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("transformers.")})
        raise ConfigError(f"ppo.max_tokens packs rows into one sequence, but this model's code "
                          f"({', '.join(names[:2])}) does not build its attention mask with transformers' create_causal_mask, which keeps "
                          "packed rows apart; leave ppo.max_tokens null (padded micro-batches)")


VARLEN_SDPA = "ppolm_varlen_sdpa"


def row_offsets(position_ids: torch.Tensor) -> torch.Tensor:
    """(1, N) positions of packed rows -> (B+1,) int32 offsets: a row starts wherever the position does not follow
    the previous one (as transformers' find_packed_sequence_indices reads them)."""
    pos = position_ids[0]
    starts = torch.nonzero(torch.diff(pos, prepend=pos[:1] - 2) != 1).flatten()
    return torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)


def varlen_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (1, H, N, d), key / value (1, H_kv, N, d) of packed rows
    -> (1, N, H, d), each row's causal sdpa on its own tokens. The rows are kwargs['cu_seq_lens_q'] (B+1,) offsets,
    or read from kwargs['position_ids']. Any other call (padded batches, generation with a KV cache) is
    transformers' sdpa, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    pos = kwargs.get("position_ids")
    if (cu is None and attention_mask is None and pos is not None and pos.dim() == 2 and pos.shape[0] == 1
            and pos.shape[1] == query.shape[2] > 1):
        cu = row_offsets(pos)
        cu = cu if cu.numel() > 2 else None  # one row: plain causal sdpa
    if cu is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: H_kv heads shared by H / H_kv query heads each
    bounds = cu.tolist()
    out = [nn.functional.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                      dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
           for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def _varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask for `varlen_sdpa_attention`: none without a padding mask (no N x N block mask is built for packed
    rows: the attention reads the row offsets; unpadded plain calls are causal, which sdpa does without a mask),
    else sdpa's. Only for models without sliding-window layers (`use_varlen_attention`)."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _sliding(cfg) -> bool:
    layer_types = getattr(cfg, "layer_types", None) or []
    return (getattr(cfg, "use_sliding_window", True) and getattr(cfg, "sliding_window", None) is not None) or any(
        "sliding" in str(t) for t in layer_types)


def use_varlen_attention(model: nn.Module | None) -> None:
    """Switch every sdpa config of `model` (policy, reference, critic backbone) to `varlen_sdpa_attention`, registered
    once with transformers. Not for a model with sliding-window layers (their masks are not plain causal: those
    keep transformers' sdpa with its packed block mask). Not saved: config.json does not record the attention
    implementation."""
    if model is None:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, _varlen_mask)
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if getattr(cfg, "_attn_implementation", None) == "sdpa" and not _sliding(cfg):
            cfg._attn_implementation = VARLEN_SDPA
