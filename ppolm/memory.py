"""Memory of a training step that changes no value: weight casts that are rebuilt instead of kept.

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
        return t if param is None else _Recast(param, t)

    def unpack(saved: torch.Tensor | _Recast) -> torch.Tensor:
        return saved.rebuild() if isinstance(saved, _Recast) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
