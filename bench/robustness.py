"""Does PPO from the base model learn on every seed and every arithmetic? The demo's PPO stage over a grid.

    python bench/robustness.py [--seeds 0,1,2,3,4] [--precisions fp32,bf16] [--threads 1] [--parallel 2]
        [--out runs/robustness] [--config configs/pipeline-demo.yaml] [KEY=VALUE ...]

Each run is `ppolm run CONFIG seed=S precision=P stages.sft=false stages.ppo_from=base report=false` (plus the
KEY=VALUE overrides, e.g. `ppo.optim.lr=5e-6`) with OMP_NUM_THREADS=T, `--parallel` of them at a time. fp32 vs
bf16 and 1 vs 2 threads change the arithmetic the way another CPU does. One line per run, then the success
count: a run succeeds when PPO's exported stage (`ppo`) ends at least --min-gain above the base model on the test
split and on every extra set (the unseen domain), was not rolled back to the base model, and its top predicted
label takes at most --max-share of the test answers. A rerun skips runs whose summary.json exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(out: Path, seed: int, precision: str, threads: int, config: str, overrides: list[str]) -> dict:
    if not (out / "summary.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "ppolm.cli", "run", config, f"seed={seed}", f"precision={precision}",
               "stages.sft=false", "stages.ppo_from=base", "report=false", f"output_dir={out}", *overrides]
        t0 = time.perf_counter()
        with open(out.parent / f"{out.name}.log", "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            return {"seed": seed, "precision": precision, "threads": threads, "error": f"exit {rc}",
                    "seconds": time.perf_counter() - t0}
    return {"seed": seed, "precision": precision, "threads": threads,
            "summary": json.loads((out / "summary.json").read_text())}


def judge(r: dict, metric: str, min_gain: float, max_share: float) -> tuple[bool, str]:
    if "error" in r:
        return False, f"seed {r['seed']} {r['precision']} t{r['threads']}: {r['error']}"
    st = r["summary"]["stages"]
    base, ppo = st["base"], st["ppo"]
    gains = {"test": ppo["metrics"][metric] - base["metrics"][metric]}
    for k in ppo.get("extra", {}):
        gains[k] = ppo["extra"][k][metric] - base["extra"][k][metric]
    share = ppo["metrics"].get("top_label_share", 0.0)
    handed_base = "no check beat the starting model" in (ppo.get("checkpoint") or "")
    ok = all(g >= min_gain for g in gains.values()) and share <= max_share and not handed_base
    val = ppo.get("validation", {})
    line = (f"seed {r['seed']} {r['precision']:4s} t{r['threads']}: base {base['metrics'][metric]:.3f}"
            + "".join(f"/{base['extra'][k][metric]:.3f}" for k in ppo.get("extra", {}))
            + f" -> ppo {ppo['metrics'][metric]:.3f}"
            + "".join(f"/{ppo['extra'][k][metric]:.3f}" for k in ppo.get("extra", {}))
            + " gain " + "/".join(f"{g:+.3f}" for g in gains.values())
            + f", validation {val.get(metric, float('nan')):.3f}, top label {share:.2f}, hands on {ppo.get('checkpoint')}"
            + (f", {ppo['guard']}" if ppo.get("guard") else "")
            + f", chosen {r['summary']['chosen']}, {ppo['train_seconds']:.0f} s -> {'OK' if ok else 'FAIL'}")
    return ok, line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", default="runs/robustness")
    ap.add_argument("--config", default="configs/pipeline-demo.yaml")
    ap.add_argument("--metric", default="accuracy")
    ap.add_argument("--min-gain", type=float, default=0.10)
    ap.add_argument("--max-share", type=float, default=0.7)
    args, overrides = ap.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = [(int(s), p, int(t)) for s in args.seeds.split(",") for p in args.precisions.split(",")
            for t in args.threads.split(",")]
    print(f"{len(grid)} runs of {args.config} {' '.join(overrides)}", flush=True)

    def one(cell):
        s, p, t = cell
        r = run_one(out / f"seed{s}-{p}-t{t}", s, p, t, args.config, overrides)
        ok, line = judge(r, args.metric, args.min_gain, args.max_share)
        print(line, flush=True)
        return ok

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        oks = list(pool.map(one, grid))
    print(f"success: {sum(oks)} of {len(oks)} (gain >= {args.min_gain} on every set, top label share <= "
          f"{args.max_share}, not handed back to the base model)")


if __name__ == "__main__":
    main()
