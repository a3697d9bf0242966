"""Seconds per step of each advantage estimator at the same batch, side by side in one run.

    OMP_NUM_THREADS=1 python bench/estimators.py [--model smollm2-135m-instruct] [--steps 3]

Every variant trains on 8 rows a step with responses of exactly 24 tokens (EOS suppressed), the toy rule
reward, KL penalty in the reward, one epoch of one minibatch: GAE-PPO with a value head, GAE-PPO with a separate
critic (the usual PPO setup of OpenRLHF/verl), and the critic-free estimators (group ones as 2 prompts x 4
samples, reinforce_pp as 8 prompts x 1). Wall s/step by phase, and CPU s/step of the process (the robust number
on a shared machine); "vs gae" divides by GAE-PPO with a value head. Each variant
runs in its own process so that its peak resident memory is its own; medians over --steps measured steps after
one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS, R = 8, 24
VARIANTS = {  # name -> overrides
    "gae (value head)": ["algo.estimator=gae"],
    "gae (separate critic)": ["algo.estimator=gae", "critic.kind=separate"],
    "grpo k=4": ["algo.estimator=grpo", "rollout.samples_per_prompt=4"],
    "rloo k=4": ["algo.estimator=rloo", "rollout.samples_per_prompt=4"],
    "dr_grpo k=4": ["algo.estimator=dr_grpo", "rollout.samples_per_prompt=4"],
    "reinforce_pp k=1": ["algo.estimator=reinforce_pp"],
}
PHASES = {"rollout": "time/rollout_s", "score": "time/score_s", "experience": "time/experience_s",
          "update": "time/update_s", "total": "time/step_s"}


def child(model: str, name: str, steps: int) -> None:
    """Run one variant; print one JSON line with the medians, peak RSS and the trainable parameter count."""
    from ppolm.config import PPORunConfig, load_config
    from ppolm.runtime import peak_rss_mb
    from ppolm.trainers.ppo import PPOTrainer

    overrides = VARIANTS[name]
    k = next((int(o.split("=")[1]) for o in overrides if o.startswith("rollout.samples_per_prompt")), 1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(PPORunConfig, None, [
            f"model={model}", f"output_dir={tmp}", "task.name=toy", "task.options.prompt_words=30",
            f"rollout.batch_size={ROWS // k}", f"rollout.max_new_tokens={R}", f"rollout.min_new_tokens={R}",
            f"ppo.minibatch_size={ROWS}", "log.progress=false", "log.tensorboard=false", "optim.lr=1e-6",
            f"max_steps={steps + 1}", *overrides,
        ])
        trainer = PPOTrainer(cfg)
        rows, cpu = [], []
        for s in range(steps + 1):
            c0 = time.process_time()
            rows.append(trainer.step(s).metrics)
            cpu.append(time.process_time() - c0)
    out = {phase: statistics.median(m[key] for m in rows[1:]) for phase, key in PHASES.items()}
    # CPU seconds of this process: on a shared machine (one thread each) wall time swings with the neighbours'
    # load, CPU time measures the work
    out["cpu"] = statistics.median(cpu[1:])
    out["peak_rss_mb"] = peak_rss_mb()  # VmHWM: a child's ru_maxrss also holds its parent's peak
    out["trainable_m"] = sum(p.numel() for g in trainer.optim.optimizer.param_groups for p in g["params"]) / 1e6
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.child, args.steps)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print(f"== {args.model}: {ROWS} rows x {R} response tokens, medians of {args.steps} steps (s/step), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    results = {}
    for name in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                               "--child", name], env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        results[name] = json.loads(line[len("RESULT "):])
        print(f"{name}: {results[name]['total']:.3f} s/step", flush=True)
    base = results.get("gae (value head)", next(iter(results.values()), {}))
    print(f"{'estimator':24s} {'rollout':>8s} {'score':>7s} {'exper.':>7s} {'update':>7s} {'total':>7s} "
          f"{'vs gae':>7s} {'cpu s':>7s} {'vs gae':>7s} {'peak MB':>8s} {'train M':>8s}")
    for name, r in results.items():
        print(f"{name:24s} {r['rollout']:8.3f} {r['score']:7.3f} {r['experience']:7.3f} {r['update']:7.3f} "
              f"{r['total']:7.3f} {r['total'] / base['total']:7.2f} {r['cpu']:7.3f} {r['cpu'] / base['cpu']:7.2f} "
              f"{r['peak_rss_mb']:8.0f} {r['trainable_m']:8.1f}")

if __name__ == "__main__":
    main()
