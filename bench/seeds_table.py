"""Mean ± std over seeds of `ppolm run` results: one Markdown table per metric from several summary.json files.

    python bench/seeds_table.py runs/demo runs/demo-seed1 runs/demo-seed2 [--metrics accuracy,top_label_share]
        [--curves [--check accuracy]]

Each argument is a pipeline output_dir (its summary.json); stages are matched by name. Prints, per stage, the
metric on the test split and on every extra set as mean ± std (sample std, n-1) with n, the training seconds,
and the guard outcomes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--metrics", default="accuracy,top_label_share")
    ap.add_argument("--curves", action="store_true", help="per run: reward first/last 5 steps, KL, held-out checks")
    ap.add_argument("--check", default="accuracy", help="the eval/<metric> of the held-out checks (--curves)")
    args = ap.parse_args()
    summaries = [json.loads((Path(r) / "summary.json").read_text()) for r in args.runs]
    stages = list(dict.fromkeys(name for s in summaries for name in s["stages"]))
    sets = list(dict.fromkeys(k for s in summaries for st in s["stages"].values() for k in st.get("extra", {})))
    for metric in args.metrics.split(","):
        cols = ["test", *sets]
        print(f"\n{metric} (mean ± std over {len(summaries)} runs)\n")
        print("| stage | " + " | ".join(cols) + " | train s | train peak MB | n |")
        print("|---|" + "---|" * (len(cols) + 3))
        for name in stages:
            rows = [s["stages"][name] for s in summaries if name in s["stages"]]
            cells = [mean_std([r["metrics"][metric] for r in rows if metric in r["metrics"]])]
            cells += [mean_std([r["extra"][k][metric] for r in rows if metric in r.get("extra", {}).get(k, {})])
                      for k in sets]
            secs = statistics.mean(r["train_seconds"] for r in rows)
            peaks = [r["train_peak_rss_mb"] for r in rows if r.get("train_peak_rss_mb")]
            peak = f"{max(peaks):.0f}" if peaks else "-"  # the largest over runs (older summaries lack it)
            print(f"| {name} | " + " | ".join(cells) + f" | {secs:.0f} | {peak} | {len(rows)} |")
    if args.curves:
        print("\nper run and RL stage: sampled reward, first 5 -> last 5 steps; KL at the last step; held-out checks")
        for run, s in zip(args.runs, summaries):
            for name, st in s["stages"].items():
                path = Path(run) / name / "metrics.jsonl"
                if not path.is_file():
                    continue
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                reward = [r["reward/mean"] for r in rows if "reward/mean" in r]
                checks = [f"{r['step']}: {r[f'eval/{args.check}']:.3f}" for r in rows if f"eval/{args.check}" in r]
                line = f"- {run} {name}:"
                if reward:
                    kl = [r["objective/kl"] for r in rows if "objective/kl" in r]
                    line += (f" reward {statistics.mean(reward[:5]):.2f} -> {statistics.mean(reward[-5:]):.2f},"
                             f" KL {kl[-1]:.2f},")
                print(f"{line} {args.check} at steps {', '.join(checks) or '-'}; {st.get('checkpoint') or ''}")
    guards = [(s.get("seed", i), name, st["guard"]) for i, s in enumerate(summaries)
              for name, st in s["stages"].items() if st.get("guard")]
    if guards:
        print("\nguard stops:")
        for run, name, line in guards:
            print(f"- run {run}, {name}: {line}")


if __name__ == "__main__":
    main()
