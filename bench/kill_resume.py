"""kill -9 a tiny PPO run N times at random moments, resume it each time, and check it ends identical.

    python bench/kill_resume.py --kills 100 [--seed 0] [--max-steps 8] [--every 1] [--checkpoint-share 0.25]

The run is configs/tiny.yaml with max_steps and checkpoint.every set, started by tests/scripts/ppo_forkserver.py
(fresh processes without the torch import each time). Kills are seeded: a share of them lands inside a
checkpoint save, the rest uniformly over each process's expected life. A run (scenario) is restarted with
resume=true until it exits 0, then compared with an uninterrupted run: final weights and the last checkpoint's
critic bitwise, metrics.jsonl steps 1..max_steps once each, every non-timing metric equal. Scenarios repeat
until N kills happened. Prints a summary: kills, identical runs, resume problems, time. Exit code 1 on any
difference or problem.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scripts"))

import kill_harness as kh


def kill_plan(rng: random.Random, checkpoint_share: float) -> Iterator[tuple[str, float]]:
    """Endless seeded kills: ('checkpoint', delay in [0, 50 ms)) with probability checkpoint_share, else
    ('time', u) with u uniform in [0, 1) of the process's expected duration."""
    while True:
        if rng.random() < checkpoint_share:
            yield "checkpoint", rng.uniform(0.0, 0.05)
        else:
            yield "time", rng.random()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=30, help="stop after this many kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--every", type=int, default=1, help="checkpoint.every")
    parser.add_argument("--checkpoint-share", type=float, default=0.25, help="share of kills inside a save")
    parser.add_argument("--max-kills-per-run", type=int, default=8, help="kills before a scenario may finish")
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    root = Path(args.out or tempfile.mkdtemp(prefix="ppolm-kill-"))
    server = kh.ForkServer(optimize=False)
    startup = time.perf_counter() - t0
    argv = [f"max_steps={args.max_steps}", f"checkpoint.every={args.every}"]
    _, timing = kh.timed_run(server, root / "reference", argv, args.max_steps)
    plan = kill_plan(random.Random(args.seed), args.checkpoint_share)

    kills = in_save = left_temp = scenarios = identical = attempts_total = 0
    problems: list[str] = []
    while kills < args.kills:
        budget = min(args.max_kills_per_run, args.kills - kills)
        run_plan = (next(plan) for _ in range(budget))
        attempts = kh.run_with_kills(server, root / f"run{scenarios}", argv, run_plan, timing, args.max_steps)
        found = kh.check_attempts(attempts) + kh.compare_runs(root / f"run{scenarios}", root / "reference",
                                                               args.max_steps)
        problems += [f"run{scenarios}: {p}" for p in found]
        identical += not found
        scenarios += 1
        attempts_total += len(attempts)
        for a in attempts:
            kills += a.killed
            in_save += a.killed and a.kill == "checkpoint"
            left_temp += a.killed and bool(a.temps_after)
        print(f"run{scenarios - 1}: {sum(a.killed for a in attempts)} kills, resumed from "
              f"{[a.resumed_from for a in attempts]}, {'identical' if not found else 'DIFFERENT'}", flush=True)
    server.close()
    elapsed = time.perf_counter() - t0
    print(f"kills: {kills} ({in_save} aimed at checkpoint saves, {left_temp} left a partial checkpoint dir)")
    print(f"runs: {scenarios}, identical to the uninterrupted run: {identical}/{scenarios}")
    print(f"processes: {attempts_total}; uninterrupted run {timing.total_s:.2f} s "
          f"(start-up {timing.startup_s:.2f} s, {timing.step_s:.2f} s/step)")
    print(f"time: {elapsed:.1f} s total, {startup:.1f} s server start-up, "
          f"{(elapsed - startup) / max(kills, 1):.2f} s per kill")
    for p in problems:
        print(f"problem: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
