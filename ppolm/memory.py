"""Memory of a training step that changes no value: weight casts that are rebuilt instead of kept, a tied
embedding's gradient built from the rows a step touches, activation checkpointing, the heap's freed blocks.

Under bf16 autocast every linear layer casts its fp32 weight to bf16 and saves that copy for the backward (the
input's gradient needs it): a bf16 copy of the model held from the forward to the backward, 0.21 GB on the
embedded model, at the step's peak (docs/bench.md, "Peak memory of a PPO step"). `recast_saved_weights` keeps
the fp32 weight it came from instead and casts again in the backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class _Recast:
    """What a saved weight cast is kept as: the fp32 parameter it was cast from, and how to cast and view it."""

    __slots__ = ("param", "version", "dtype", "size", "stride", "offset")

    def __init__(self, param: torch.Tensor, saved: torch.Tensor) -> None:
        self.param, self.version, self.dtype = param, param._version, saved.dtype
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()

    def rebuild(self) -> torch.Tensor:
        """The saved tensor again: the same cast of the same weight, viewed as it was saved."""
        if self.param._version != self.version:
            raise RuntimeError("a weight saved for backward was modified in place before the backward")
        with torch.no_grad():
            return self.param.detach().to(self.dtype).as_strided(self.size, self.stride, self.offset)


def _cast_source(t: torch.Tensor) -> torch.Tensor | None:
    """The parameter that `t` (or the tensor it views) is a plain dtype cast of, else None. An autograd-recorded
    cast of a leaf is ToCopyBackward0 -> AccumulateGrad(leaf): exactly what autocast makes of a weight."""
    base = t if t._base is None else t._base
    fn = base.grad_fn
    if fn is None or fn.name() != "ToCopyBackward0" or len(fn.next_functions) != 1:
        return None
    param = getattr(fn.next_functions[0][0], "variable", None)
    if (param is None or type(param) not in (torch.Tensor, torch.nn.Parameter) or hasattr(param, "ds_id")
            or param.dtype == t.dtype or param.device != t.device or param.shape != base.shape
            or not (param.is_contiguous() and base.is_contiguous())):
        return None  # (ds_id: a DeepSpeed ZeRO-3 partition, emptied after the forward)
    return param


@contextlib.contextmanager
def recast_saved_weights() -> Iterator[None]:
    """While active, a low-precision cast of a weight that an op saves for backward (autocast's bf16 copy of every
    linear layer's weight) is not kept: the backward casts the fp32 weight again. The same cast of the same
    weight gives the same bits, so gradients are unchanged; the forward's graph no longer holds a bf16 copy of
    the model (0.21 GB on the embedded model) until the backward, at the cost of one cast per weight in it.
    Pair it with autocast(cache_enabled=False), whose cache would otherwise keep those copies for the whole
    forward. Weights must not change between the forward and the backward (checked: RuntimeError)."""

    def pack(t: torch.Tensor) -> torch.Tensor | _Recast:
        param = _cast_source(t)
        # Any other tensor is kept detached: kept as is, an op's own output (silu, exp, softmax save theirs)
        # would hold the node that holds it, a cycle Python's collector cannot see, and a graph dropped without
        # a backward (an out-of-memory retry) would never be freed. Autograd reattaches the grad_fn on unpack.
        return t.detach() if param is None else _Recast(param, t)

    def unpack(saved: torch.Tensor | _Recast) -> torch.Tensor:
        return saved.rebuild() if isinstance(saved, _Recast) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


# Ops whose outputs selective checkpointing keeps: the matmuls and attention, the work worth not redoing. Every
# other op of a checkpointed layer (norms, activations, rotary, residual adds, dtype casts) is recomputed.
def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"]
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


_SAVED_OPS = _saved_ops()


def _keep_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def enable_activation_checkpointing(model: torch.nn.Module, mode: bool | str) -> None:
    """Activation checkpointing of each transformer layer of a transformers model. mode:
    - False: none; every layer keeps what its ops save for the backward.
    - "selective": each layer keeps its matmul and attention outputs and recomputes the cheap ops in the backward
      (norms, SiLU and its product, rotary, residual adds, bf16 casts) from them: the same ops on the same inputs,
      so the same values and gradients bit for bit, with ~40% less saved per token (0.23 GB at the PPO step's peak
      on the embedded model) for a few elementwise passes (torch's selective activation checkpointing). Off
      under DeepSpeed ZeRO-3 and for a model whose code does not support checkpointing.
    - True: each layer keeps only its input and runs its whole forward again in the backward (the most memory
      saved, one more forward of time); the model's config then says use_cache False, as transformers asks.
    """
    if mode is False:
        return
    if mode not in (True, "selective"):  # ('auto' is resolved by the trainer, before the model is built)
        raise ValueError(f"gradient_checkpointing {mode!r}: expected False, True or 'selective' here")
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        import functools

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        from ppolm import zero

        if zero.deepspeed_requested() and zero.zero_stage() == 3:
            # ZeRO-3 gathers each module's weights from inside the layer (its module hooks): collectives that the
            # recompute would have to replay exactly; that layer keeps its activations instead
            return
        if not getattr(model, "supports_gradient_checkpointing", False):
            return  # (the default must not refuse a model whose code has no checkpointing hook; true still does)
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.x names it so (gradient_checkpointing_enable: deprecated alias)
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode is True:
        model.config.use_cache = False


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks up to 1 GiB come from the heap and freed memory up to 2 GiB stays there for the next step
RETAIN_BLOCKS_UP_TO, RETAIN_FREED_UP_TO = 1 << 30, 1 << 31


def retain_freed_memory() -> bool:
    """Keep freed blocks in the process's heap for reuse instead of handing them back to the kernel (glibc only).
    Opt-in, `PPOLM_MALLOC_TUNING=1` (every CPU Runtime calls this); returns whether it took effect.

    Why it exists: glibc serves every block above its mmap threshold (at most 32 MB by default) with fresh pages
    and unmaps them on free, so each step's large tensors (the (B, R, V) logits and their softmax, the (V, H)
    gradient of a tied embedding, ...) are page-faulted and zeroed by the kernel again at every step: a 113 MB
    `a + b` took 0.09 s against 0.02 s in reused memory on the 2-core CPU. Why it is not the default: on the
    embedded model's PPO step (bench/ppo_step.py, three interleaved repetitions) it raised the peak by 0.1-0.25
    GiB (freed memory stays resident, and the heap fragments) for a step-time gain within that machine's noise
    (ratios 0.86-1.21); docs/bench.md."""
    import ctypes
    import os
    import sys

    if os.environ.get("PPOLM_MALLOC_TUNING", "0") != "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, RETAIN_BLOCKS_UP_TO)) & bool(mallopt(_M_TRIM_THRESHOLD,
                                                                               RETAIN_FREED_UP_TO))


class RowSparseGradEmbedding(torch.nn.Embedding):
    """An nn.Embedding whose weight gradient is sparse over the rows looked up (ppolm.ops.embedding_row_sparse).
    Installed by class swap on the trained copy only; state, saving and every isinstance check are unchanged."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        from ppolm.ops import embedding_row_sparse

        return embedding_row_sparse(input, self.weight, self.padding_idx)


def row_sparse_tied_embeddings(model: torch.nn.Module) -> int:
    """Give every trained input embedding of `model` that is tied to its LM head a row-sparse gradient; returns how
    many. Tied only: the head's dense gradient then absorbs the sparse one in autograd's sum, so the parameter's
    .grad stays dense, equal bit for bit, without the (V, H) zero fill and the full add (~0.09 GiB less at the PPO
    step's peak on the embedded model, and a few percent off its update; docs/bench.md).
    Single-process CPU training only (Runtime.prepare): DDP decides at wrap time which gradients are sparse,
    FSDP2's and ZeRO's partitions take none, and on CUDA index_add_ is not deterministic."""
    from transformers import PreTrainedModel

    n = 0
    for m in model.modules():
        if not isinstance(m, PreTrainedModel):
            continue
        emb, head = m.get_input_embeddings(), m.get_output_embeddings()
        if (type(emb) is torch.nn.Embedding and emb.weight is getattr(head, "weight", None)
                and emb.weight.requires_grad and emb.max_norm is None and not emb.scale_grad_by_freq
                and not emb.sparse):
            emb.__class__ = RowSparseGradEmbedding
            n += 1
    return n
