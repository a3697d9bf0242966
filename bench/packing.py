"""Padded vs packed micro-batches (`ppo.max_tokens`) on the PPO stages of the NER and translation pipelines.

    python bench/packing.py [--configs ner,translation] [--steps 3] [--model smollm2-135m-instruct]
                            [--max-tokens 100000] [--set KEY=VALUE ...]

For each pipeline config (configs/pipeline-<name>.yaml: its task, data and `ppo:` section, from the base model,
no held-out checks or guards), two sides run the same steps, each in its own process (so each peak RSS is its
own), one after the other: `padded` (the default) and `packed` (`ppo.max_tokens=N`; the default N holds a whole
batch, so both sides take the same number of micro-batches and differ only in packing). Both sample the same
rollouts (sampling does not depend on packing), so their results agree within float rounding: the script prints
each step's reward, KL and policy loss side by side. Reports medians over --steps measured steps after one
warm-up step of: the scoring + update passes (`time/experience_s` + `time/update_s`, what packing changes), the
whole step, the padding share of the scoring/update grid (1 - real tokens / (rows x padded width)), and each
side's peak RSS; then the padded/packed ratios. This machine is shared and noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDES = {"padded": (), "packed": ("ppo.max_tokens={max_tokens}",)}
ECHO = ("reward/mean", "objective/kl", "loss/policy")


def stage_config(name: str) -> dict:
    """The `ppolm ppo` config (as a dict) of the PPO stage of configs/pipeline-<name>.yaml, from the base model."""
    import yaml

    pipe = yaml.safe_load((ROOT / f"configs/pipeline-{name}.yaml").read_text())
    ppo = {k: v for k, v in pipe.get("ppo", {}).items() if k not in ("eval", "guard", "max_steps", "log")}
    task = {k: v for k, v in pipe["task"].items() if k in ("name", "data", "options")}
    return {"model": pipe["model"], "seed": pipe.get("seed", 0), "precision": pipe.get("precision", "auto"),
            "task": task, **ppo}


def run_side(config: str, side: str, steps: int, model: str, max_tokens: int, extra: list[str]) -> dict:
    """One side in this process: returns per-step metrics, padding shares and the peak RSS."""
    import torch

    import yaml

    from ppolm.config import PPORunConfig, load_config
    from ppolm.runtime import peak_rss_mb
    from ppolm.trainers.ppo import PPOTrainer

    data = stage_config(config)
    out = tempfile.mkdtemp(prefix=f"bench-packing-{config}-{side}-")
    data.update(model=model, output_dir=out, max_steps=steps + 1, overwrite_output_dir=True,
                log={"progress": False, "tensorboard": False, "samples_every": 0}, checkpoint={"every": 0})
    overrides = [o.format(max_tokens=max_tokens) for o in SIDES[side]] + extra
    path = Path(out) / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(PPORunConfig, path, overrides)
    torch.manual_seed(0)
    t = PPOTrainer(cfg)
    shares: list[float] = []
    experience = t.experience

    def traced(rollout, scores, policy_out=None):  # the grid every scoring and update forward would pad to
        m = rollout.attention_mask
        shares.append(1.0 - float(m.sum()) / m.numel())
        return experience(rollout, scores, policy_out)

    t.experience = traced
    rows = []
    for s in range(steps + 1):
        metrics = t.step(s).metrics
        rows.append({k: float(v) for k, v in metrics.items()})
    return {"steps": rows, "padding_share": shares, "peak_rss_gib": peak_rss_mb() / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="ner,translation")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=100000)
    ap.add_argument("--set", nargs="*", default=[], dest="extra")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side, print JSON
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print("RESULT " + json.dumps(run_side(args.config, args.side, args.steps, args.model, args.max_tokens,
                                              args.extra)))
        return
    for config in args.configs.split(","):
        results = {}
        for side in SIDES:
            cmd = [sys.executable, __file__, "--side", side, "--config", config, "--steps", str(args.steps),
                   "--model", args.model, "--max-tokens", str(args.max_tokens), "--set", *args.extra]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{config}/{side} failed:\n{proc.stderr[-3000:]}")
            results[side] = json.loads(line[len("RESULT "):])
        report(config, results, args)


def report(config: str, results: dict, args) -> None:
    print(f"\n== {config} (configs/pipeline-{config}.yaml PPO stage, {args.model}, {args.steps} steps after 1 "
          f"warm-up, packed: ppo.max_tokens={args.max_tokens}) ==")
    print("step  " + "  ".join(f"{k} padded / packed" for k in ECHO))
    pad, pack = results["padded"]["steps"], results["packed"]["steps"]
    for s, (a, b) in enumerate(zip(pad, pack)):
        print(f"{s:4d}  " + "  ".join(f"{a[k]:.6f} / {b[k]:.6f}" for k in ECHO))
    med = lambda rows, f: statistics.median(f(r) for r in rows[1:])  # noqa: E731
    passes = lambda r: r["time/experience_s"] + r["time/update_s"]  # noqa: E731
    table = {}
    for side, res in results.items():
        rows = res["steps"]
        table[side] = (med(rows, passes), med(rows, lambda r: r["time/step_s"]),
                       statistics.median(res["padding_share"][1:]), res["peak_rss_gib"])
    print(f"{'side':8s} {'score+update s':>15s} {'step s':>8s} {'padding share':>14s} {'peak RSS GiB':>13s}")
    for side, (p, st, share, rss) in table.items():
        print(f"{side:8s} {p:15.3f} {st:8.3f} {share:14.2f} {rss:13.2f}")
    (p0, s0, _, r0), (p1, s1, _, r1) = table["padded"], table["packed"]
    print(f"ratio padded/packed: score+update {p0 / p1:.2f}, step {s0 / s1:.2f}, peak RSS {r0 / r1:.2f}")


if __name__ == "__main__":
    main()
