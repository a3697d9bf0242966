"""bench/profile_groups.py: ops land in the right group and the groups add up to the step's wall time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from profile_groups import ORDER, group_of, grouped, median_groups, profile  # noqa: E402


@pytest.mark.parametrize("op, group", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_fused_adamw_", "optimizer"), ("aten::_foreach_norm", "optimizer"),
    ("aten::to", "casts & copies"), ("aten::topk", "elementwise & reductions"), ("aten::_to_copy", "casts & copies"), ("aten::copy_", "casts & copies"), ("aten::index_select", "casts & copies"),
    ("aten::mul", "elementwise & reductions"), ("aten::silu", "elementwise & reductions"),
    ("aten::sum", "elementwise & reductions"), ("## forward ##", None), ("Optimizer.step#AdamW.step", None),
])
def test_group_of(op, group):
    assert group_of(op) == group


def test_grouped_by_hand():
    # 2.0 s wall: 0.8 s of matmul, 0.3 attention, 0.1 + 0.1 casts, 0.2 elementwise, a label's 0.1 s self time is
    # Python: 2.0 - 1.5 = 0.5 s unaccounted
    times = {"aten::mm": 0.5, "aten::addmm": 0.3, "aten::_scaled_dot_product_flash_attention_for_cpu": 0.3,
             "aten::_to_copy": 0.1, "aten::copy_": 0.1, "aten::mul": 0.2, "## forward ##": 0.1}
    g = grouped(times, 2.0)
    assert list(g) == ORDER
    assert g["matmul"] == pytest.approx(0.8) and g["attention"] == pytest.approx(0.3)
    assert g["casts & copies"] == pytest.approx(0.2) and g["elementwise & reductions"] == pytest.approx(0.2)
    assert g["optimizer"] == 0.0 and g["python & other"] == pytest.approx(0.5)
    assert grouped({"aten::mm": 3.0}, 2.0)["python & other"] == 0.0  # never negative


def test_profile_of_a_matmul_heavy_step():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    g = profile(lambda: [a @ b for _ in range(20)])
    assert g["matmul"] > 0.5 * g["wall"]  # 20 products of 256 x 256: the GEMMs are most of the time
    assert sum(g[k] for k in ORDER) >= g["wall"] * (1 - 1e-9)  # nothing of the wall time is lost


def test_profile_lists_its_largest_ops_with_their_shapes():
    a, b, c = torch.randn(256, 256), torch.randn(256, 256), torch.randn(64, 64)
    g = profile(lambda: [(a @ b, c + c) for _ in range(10)], top=3)
    op, shapes, calls, seconds = g["top"][0]
    assert op == "aten::mm" and shapes == "[[256, 256], [256, 256]]" and calls == 10 and seconds > 0
    assert len(g["top"]) <= 3 and all(r[3] <= seconds for r in g["top"])
    from profile_groups import top_lines

    assert "aten::mm [[256, 256], [256, 256]]" in top_lines(g)[0] and "matmul" in top_lines(g)[0]


def test_median_groups_takes_each_groups_median_over_the_profiled_steps():
    runs = [{**{g: float(i) for g in ORDER}, "wall": 10.0 * i} for i in (3, 1, 2)]
    m = median_groups(runs)
    assert m["runs"] == 3 and m["wall"] == 20.0 and all(m[g] == 2.0 for g in ORDER)


def test_profile_without_shapes_records_none():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    g = profile(lambda: [a @ b for _ in range(5)], shapes=False)
    assert g["matmul"] > 0 and all(shapes in ("", "[]") for _, shapes, _, _ in g["top"])


def test_the_bench_child_profiles_as_many_steps_as_it_times(tmp_path):
    """bench/ppo_step.py's ppolm side with --profile, on the tiny model: the timed phases, the peak read before
    profiling, the groups as medians over the profiled steps, the largest ops from one more step with shapes."""
    from ppo_step import child, rm_dir

    out = child("ppolm", "tiny-random-llama", 2, 4, rm_dir("tiny-random-llama", tmp_path), profiled=True)
    assert out["total"] > 0 and out["peak_rss_gib"] > 0
    p = out["profile"]
    assert p["runs"] == 2 and p["wall"] > 0 and p["matmul"] > 0
    assert p["top"] and any(shapes not in ("", "[]") for _, shapes, _, _ in p["top"])
