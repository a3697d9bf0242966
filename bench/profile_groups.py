"""Where one step's CPU time goes, by kind of work: torch.profiler's self time of every aten op, grouped.

Used by `bench/ppo_step.py --profile`. Groups (`GROUPS`, first match wins):
- matmul: the GEMMs (mm, addmm, bmm, baddbmm, the LM head and every linear layer's product);
- attention: the fused scaled-dot-product kernels (their softmax and products included);
- optimizer: AdamW's fused / foreach kernels and the gradient-norm clip's foreach ops;
- casts & copies: dtype casts and memory movement (to, _to_copy, copy_, clone, cat, index, gather, ...);
- elementwise & reductions: every other aten op (add, mul, silu, rsqrt, exp, log_softmax, sum, mean, ...);
- python & other: the step's wall time minus all ops' self time: the interpreter, transformers' module code,
  autograd's bookkeeping, the sampler's loop, the profiler's own cost.
Only the matmul group speeds up with a faster matmul unit (AMX, a GPU's tensor cores): the rest is what stays
when matmuls get fast, so its share can be measured on any CPU. The profiler adds its own overhead to every op
(a few microseconds each), so the shares of a profiled step are indicative, its wall time a little long.
"""

from __future__ import annotations

import time
from collections.abc import Callable

GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
                "aten::_int_mm", "aten::_weight_int8pack_mm", "mkldnn::", "aten::mkldnn_rnn")),
    ("attention", ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_flash_attention",
                   "aten::_efficient_attention")),
    ("optimizer", ("aten::_fused_adamw", "aten::_fused_adam", "aten::_foreach_")),
    ("casts & copies", ("aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous",
                        "aten::cat", "aten::stack", "aten::index", "aten::gather", "aten::scatter",
                        "aten::embedding", "aten::masked_fill", "aten::fill_", "aten::zero_", "aten::empty",
                        "aten::resize_", "aten::pad", "aten::constant_pad_nd")),
    ("elementwise & reductions", ("aten::",)),
]
ORDER = [g for g, _ in GROUPS] + ["python & other"]


def group_of(op: str) -> str | None:
    """The group of an op name (`aten::mm` -> 'matmul'), None for a non-aten event (a record_function label,
    whose self time is Python and counts in 'python & other')."""
    if op == "aten::to":  # the cast's dispatcher; a prefix would also take aten::topk
        return "casts & copies"
    for group, prefixes in GROUPS:
        if op.startswith(prefixes):
            return group
    return None


def grouped(self_times: dict[str, float], wall: float) -> dict[str, float]:
    """Seconds per group (`ORDER`) from each op's self time (seconds) and the step's wall time; 'python & other'
    is the wall time the ops do not account for (never below 0)."""
    out = {g: 0.0 for g in ORDER}
    for op, seconds in self_times.items():
        g = group_of(op)
        if g is not None:
            out[g] += seconds
    out["python & other"] = max(0.0, wall - sum(out[g] for g, _ in GROUPS))
    return out


def profile(fn: Callable[[], object], top: int = 10, shapes: bool = True) -> dict:
    """Run fn once under torch.profiler (CPU) and return seconds per group, 'wall', and 'top': the `top` aten ops
    by self time as [op, input shapes, calls, seconds] (an op with one shape that costs far more than its FLOPs
    is how the LM head's batched product and the page faults of docs/bench.md were found). shapes=False records
    no input shapes (the shapes in 'top' are then empty strings): recording them costs time in every op, which inflates
    the small ops' share (docs/bench.md: a step measured 4.80 s profiled with shapes against 3.07 s timed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    self_times: dict[str, float] = {}
    by_shape = []
    for evt in prof.key_averages(group_by_input_shape=shapes):
        self_times[evt.key] = self_times.get(evt.key, 0.0) + evt.self_cpu_time_total / 1e6
        if group_of(evt.key) is not None:
            by_shape.append([evt.key, str(evt.input_shapes), evt.count, evt.self_cpu_time_total / 1e6])
    by_shape.sort(key=lambda r: -r[3])
    return {**grouped(self_times, wall), "wall": wall, "top": by_shape[:top]}


def median_groups(runs: list[dict]) -> dict:
    """Per group (and 'wall'), the median seconds over several profiled steps; 'runs' says how many."""
    import statistics

    return {**{k: statistics.median(r[k] for r in runs) for k in [*ORDER, "wall"]}, "runs": len(runs)}


def line(groups: dict[str, float]) -> str:
    """One printable line: every group's seconds and share of the wall, then the non-matmul share."""
    wall = groups["wall"]
    parts = [f"{g} {groups[g]:.2f} s ({100 * groups[g] / wall:.0f}%)" for g in ORDER]
    runs = f" (medians of {groups['runs']} profiled steps)" if groups.get("runs", 1) > 1 else ""
    return (f"profiled step {wall:.2f} s{runs}: " + ", ".join(parts)
            + f"; non-matmul {wall - groups['matmul']:.2f} s = {100 * (1 - groups['matmul'] / wall):.0f}%")


def top_lines(groups: dict) -> list[str]:
    """The profile's largest ops, one printable line each: seconds, calls, group, op, input shapes."""
    return [f"  {sec:7.3f} s {calls:6d}x  {group_of(op):24s} {op} {shapes}"
            for op, shapes, calls, sec in groups.get("top", [])]
