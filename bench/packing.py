"""Padded vs packed micro-batches (`ppo.max_tokens`) on the PPO stages of the NER and translation pipelines.

    python bench/packing.py [--configs ner,translation] [--reps 3] [--model smollm2-135m-instruct]
                            [--max-tokens 100000] [--set KEY=VALUE ...]

For each pipeline config (configs/pipeline-<name>.yaml: its task, data and `ppo:` section, from the base model, no
held-out checks or guards), one process builds the PPO trainer, runs one step (warm-up), samples and scores the
next step's rollout, and then times the passes packing changes -- the scoring pass (old log-probs, values,
reference) and the update (the config's epochs x minibatches, optimizer steps included) -- on that same rollout
from the same weights and optimizer state, `padded` and `packed` in alternation (`--reps` times each, the order
swapped every repetition), so a shared machine's drift hits both sides alike. `packed` is `ppo.max_tokens=N`; the
default N holds the whole batch, so both sides take the same micro-batches and differ only in packing. Prints
per side the median seconds of the two passes, the padding share of the (rows x padded width) grid they would
otherwise compute, the peak RSS during that side's passes, and the results of its first repetition (mean old
log-prob, KL, policy and value loss: equal within the precision's rounding), then padded/packed ratios.
This machine is shared and noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ("objective/kl", "loss/policy", "loss/value", "optim/grad_norm")


def stage_config(name: str) -> dict:
    """The `ppolm ppo` config (as a dict) of the PPO stage of configs/pipeline-<name>.yaml, from the base model."""
    import yaml

    pipe = yaml.safe_load((ROOT / f"configs/pipeline-{name}.yaml").read_text())
    ppo = {k: v for k, v in pipe.get("ppo", {}).items() if k not in ("eval", "guard", "max_steps", "log")}
    task = {k: v for k, v in pipe["task"].items() if k in ("name", "data", "options")}
    return {"model": pipe["model"], "seed": pipe.get("seed", 0), "precision": pipe.get("precision", "auto"),
            "task": task, **ppo}


def bench_config(config: str, args) -> None:
    import yaml

    from ppolm.config import PPORunConfig, load_config
    from ppolm.runtime import peak_rss_mb, reset_peak_rss
    from ppolm.trainers.ppo import PPOTrainer

    data = stage_config(config)
    out = Path(tempfile.mkdtemp(prefix=f"bench-packing-{config}-"))
    data.update(model=args.model, output_dir=str(out), max_steps=2, overwrite_output_dir=True,
                log={"progress": False, "tensorboard": False, "samples_every": 0}, checkpoint={"every": 0})
    (out / "bench.yaml").write_text(yaml.safe_dump(data))
    # built packed: sdpa models get the per-row attention, whose unpacked calls are plain sdpa (tests/test_packing.py)
    cfg = load_config(PPORunConfig, out / "bench.yaml", [f"ppo.max_tokens={args.max_tokens}", *args.extra])
    t = PPOTrainer(cfg)
    t.step(0)  # warm-up, and a policy that has moved once
    rollout, examples, _ = t.rollout(1)
    scores, _ = t.score(rollout, examples)
    mask = rollout.attention_mask
    share = 1.0 - float(mask.sum()) / mask.numel()
    snapshot = copy.deepcopy((t.actor.state_dict(), t.optim.optimizer.state_dict(), t.optim.scheduler.state_dict()))
    sides = {"padded": None, "packed": args.max_tokens}
    times = {s: [] for s in sides}
    peaks = {s: 0.0 for s in sides}
    results = {}
    for rep in range(args.reps):
        for side in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
            t.actor.load_state_dict(snapshot[0])
            t.optim.optimizer.load_state_dict(snapshot[1])
            t.optim.scheduler.load_state_dict(snapshot[2])
            t.micro.max_tokens = sides[side]
            reset_peak_rss()
            t0 = time.perf_counter()
            exp, exp_metrics, fused = t._experience_phase(rollout, scores)
            upd = t.update(exp, 1, fused)
            times[side].append(time.perf_counter() - t0)
            peaks[side] = max(peaks[side], peak_rss_mb() / 1024)
            if side not in results:
                m = exp.response_mask
                results[side] = {"old_logprob_mean": float((exp.old_logprobs * m).sum() / m.sum()),
                                 **{k: v for k, v in {**exp_metrics, **upd}.items() if k in RESULTS}}
            del exp, fused
    print(f"\n== {config}: configs/pipeline-{config}.yaml PPO stage, {args.model}, precision {cfg.precision} "
          f"({t.amp or 'fp32'}), {len(rollout.completions)} rows x {mask.shape[1]} columns, packed "
          f"ppo.max_tokens={args.max_tokens}, {args.reps} reps each, alternating ==")
    keys = list(results["padded"])
    print(f"{'side':8s} {'scoring+update s':>17s} {'padding share':>14s} {'peak RSS GiB':>13s}  "
          + "  ".join(keys))
    for side in sides:
        print(f"{side:8s} {statistics.median(times[side]):17.3f} {share if side == 'padded' else 0.0:14.3f} "
              f"{peaks[side]:13.2f}  " + "  ".join(f"{results[side][k]:.6g}" for k in keys))
    print(f"  all times padded: {', '.join(f'{x:.2f}' for x in times['padded'])}; "
          f"packed: {', '.join(f'{x:.2f}' for x in times['packed'])}")
    p0, p1 = statistics.median(times["padded"]), statistics.median(times["packed"])
    print(f"ratio padded/packed: scoring+update {p0 / p1:.2f}, peak RSS {peaks['padded'] / peaks['packed']:.2f}; "
          f"padding share removed {share:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="ner,translation")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=100000)
    ap.add_argument("--set", nargs="*", default=[], dest="extra")
    args = ap.parse_args()
    for config in args.configs.split(","):
        bench_config(config, args)


if __name__ == "__main__":
    main()
