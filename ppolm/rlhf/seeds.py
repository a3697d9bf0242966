"""Several seeds of the RLHF flow in one table: mean +- std of every method's metrics over the runs' summary.json
files, and issue 23's acceptance checks read from the means.

    python -m ppolm.rlhf.seeds runs/rlhf-s0/summary.json runs/rlhf-s1/summary.json runs/rlhf-s2/summary.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

KEYS = ("rm_score", "judge_positive_share", "perplexity", "distinct_1", "distinct_2", "length_words", "kl")


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of per-seed values; std 0.0 for a single seed."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_means(summaries: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> metric -> (mean, std) over the summaries that have the method and a numeric metric."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for method in dict.fromkeys(m for s in summaries for m in s["methods"]):
        rows = [s["methods"][method]["metrics"] for s in summaries if method in s["methods"]]
        out[method] = {k: mean_std([r[k] for r in rows]) for k in KEYS
                       if all(isinstance(r.get(k), (int, float)) for r in rows)}
    return out


def acceptance(means: dict[str, dict[str, tuple[float, float]]]) -> list[tuple[str, bool | None, str]]:
    """Issue 23's checks on the means: (check, passed or None when a method is missing or no bar is set, the
    numbers compared)."""
    def get(method: str, key: str) -> float | None:
        return means.get(method, {}).get(key, (None,))[0]

    def check(name: str, a: float | None, b: float | None, passes) -> tuple[str, bool | None, str]:
        shown = " vs ".join("-" if v is None else f"{v:.3f}" for v in (a, b))
        return name, None if a is None or b is None else bool(passes(a, b)), shown

    share = {m: get(m, "judge_positive_share") for m in ("ppo", "sft", "dpo")}
    p_rm, b_rm, bo_rm = get("ppo", "rm_score"), get("base", "rm_score"), get("best-of-16", "rm_score")
    gain = None if None in (p_rm, b_rm, bo_rm) or bo_rm == b_rm else (p_rm - b_rm) / (bo_rm - b_rm)
    return [
        check("PPO judge positive share >= SFT's + 0.10", share["ppo"], share["sft"], lambda a, b: a >= b + 0.10),
        check("PPO judge positive share >= DPO's", share["ppo"], share["dpo"], lambda a, b: a >= b),
        check("PPO perplexity <= 1.5 x SFT's", get("ppo", "perplexity"), get("sft", "perplexity"),
              lambda a, b: a <= 1.5 * b),
        check("PPO distinct-2 >= 0.8 x the base's", get("ppo", "distinct_2"), get("base", "distinct_2"),
              lambda a, b: a >= 0.8 * b),
        ("PPO's share of best-of-16's reward-model gain over the base (no bar set)", None,
         "-" if gain is None else f"{gain:.2f}"),
    ]


def markdown(summaries: list[dict]) -> str:
    """The mean +- std table over seeds and the acceptance lines, as markdown."""
    means = seed_means(summaries)
    lines = [f"{len(summaries)} seeds ({', '.join(str(s.get('seed')) for s in summaries)}), mean ± std over seeds",
             "", "| method | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for method, m in means.items():
        lines.append(f"| {method} | " + " | ".join(f"{m[k][0]:.3f} ± {m[k][1]:.3f}" if k in m else "-" for k in KEYS)
                     + " |")
    lines += ["", *[f"- {name}: {'pass' if ok else 'FAIL' if ok is False else '-'} ({nums})"
                    for name, ok, nums in acceptance(means)]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    print(markdown([json.loads(Path(p).read_text(encoding="utf-8")) for p in argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
