"""`ppolm plan` against measured peaks: the predicted-vs-measured table of docs/bench.md.

    python bench/plan_check.py [--model smollm2-135m-instruct] [--responses 24,96,256] [--modes false,selective,true]
                               [--layouts 1,ddp,fsdp2,zero2,zero3] [--steps 1]

1-process rows: bench/ppo_step.py's ppolm side (batch 8, responses of exactly R tokens, a bf16 reward model, one
epoch of one minibatch, peak = the child's VmHWM, glibc's default allocator settings) at each response length
and `gradient_checkpointing` mode. Layout rows: bench/scale.py (the smollm2-ppo recipe in fp32, 8 prompts a step
over the processes, MALLOC_MMAP_THRESHOLD_=65536, the largest peak over the processes), at the config's default
checkpointing. Each row's prediction is `ppolm.plan_report.build_plan` for the same config, prompt width and
layout. A row is within the target when |predicted / measured - 1| <= 15%.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SCALE_LAYOUTS = {"1": ("1 process", None, 8), "ddp": ("DDP", "cpu-ddp-2.yaml", 4), "fsdp2": ("FSDP2", "fsdp2-cpu.yaml", 4),
                 "zero2": ("ZeRO-2", "deepspeed-zero2-cpu.yaml", 4), "zero3": ("ZeRO-3", "deepspeed-zero3-cpu.yaml", 4)}
GIB = 2**30


def predicted(overrides: list[str], launch: str | None, config: str | None = None) -> tuple[float, str]:
    """(predicted peak GiB per process of the launched layout, its checkpointing mode) for a PPO config."""
    from ppolm.config import PPORunConfig, load_config
    from ppolm.plan_report import build_plan

    cfg = load_config(PPORunConfig, config, overrides)
    plan = build_plan(cfg, launch=launch, memory=1 << 50)
    mode = plan["gradient_checkpointing"]
    return plan["layouts"][plan["launch"]]["peak_bytes_by_mode"][mode] / GIB, mode


def step_rows(model: str, responses: list[int], modes: list[str], steps: int) -> list[tuple]:
    """(label, predicted GiB, measured GiB) for bench/ppo_step.py's ppolm side at each (R, mode)."""
    import ppo_step

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rm = ppo_step.rm_dir(model, Path(tmp))
        for R in responses:
            for mode in modes:
                over = [f"gradient_checkpointing={mode}"]
                cfg = ppo_step.ppolm_trainer_overrides(model, rm, steps, R, Path(tmp) / "run") + over
                pred, _ = predicted(cfg, None)
                meas = ppo_step.run_side("ppolm", model, steps, R, rm, over)["peak_rss_gib"]
                rows.append((f"ppo_step R={R} {mode}", pred, meas))
                print(f"{rows[-1][0]:34s} predicted {pred:6.2f} GiB  measured {meas:6.2f} GiB  "
                      f"{100 * (pred / meas - 1):+6.1f}%", flush=True)
    return rows


def scale_rows(model: str, layouts: list[str], steps: int, mode: str) -> list[tuple]:
    """(label, predicted GiB, measured GiB) for bench/scale.py's layouts at checkpointing `mode`."""
    import scale

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in layouts:
            name, launch, n_rows = SCALE_LAYOUTS[key]
            over = ["log.progress=false", "eval.every=0", "guard.max_drop=null", "guard.collapse_share=null",
                    "precision=fp32", f"model={model}", f"rollout.batch_size={n_rows}", f"ppo.minibatch_size={n_rows}",
                    f"gradient_checkpointing={mode}"]
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # as scale.py sets it in its processes (the planner reads it)
            try:
                pred, mode = predicted(over, str(ROOT / "configs/accelerate" / launch) if launch else None,
                                       str(ROOT / "configs/smollm2-ppo.yaml"))
            finally:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_")
            out = Path(tmp) / key
            out.mkdir()
            meas = scale.run_layout(launch, n_rows, model, steps, out, 65536,
                                    (f"gradient_checkpointing={mode}",))["peak_mb"] / 1024
            rows.append((f"scale {name} {mode}", pred, meas))
            print(f"{rows[-1][0]:34s} predicted {pred:6.2f} GiB  measured {meas:6.2f} GiB  "
                  f"{100 * (pred / meas - 1):+6.1f}%", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--responses", default="24,96,256")
    ap.add_argument("--modes", default="false,selective,true")
    ap.add_argument("--layouts", default="", help="bench/scale.py layouts to measure: 1,ddp,fsdp2,zero2,zero3")
    ap.add_argument("--steps", type=int, default=1, help="measured steps after the warm-up step")
    ap.add_argument("--layout-mode", default="selective", help="gradient_checkpointing of the layout rows")
    a = ap.parse_args()
    rows = []
    if a.responses:
        rows += step_rows(a.model, [int(r) for r in a.responses.split(",")], a.modes.split(","), a.steps)
    if a.layouts:
        rows += scale_rows(a.model, a.layouts.split(","), max(a.steps, 2), a.layout_mode)
    print("\n| run | predicted GiB | measured GiB | error |\n| --- | ---: | ---: | ---: |")
    for label, pred, meas in rows:
        print(f"| {label} | {pred:.2f} | {meas:.2f} | {100 * (pred / meas - 1):+.1f}% |")
    worst = max((abs(p / m - 1) for _, p, m in rows), default=0.0)
    print(f"worst error {100 * worst:.1f}% ({'within' if worst <= 0.15 else 'OUTSIDE'} +-15%)")


if __name__ == "__main__":
    main()
