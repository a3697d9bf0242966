"""The RLHF flow's report: report.html (self-contained) and report.md with the methods table, the reward-KL
frontier, the reward-hacking flags and every method's continuation of the same test prompts."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from ppolm.eval.intervals import Z_95
from ppolm.eval.report import _html_table, _md_table, _png, _read_jsonl, plt

COLUMNS = [("rm_score", "RM score"), ("judge_positive_share", "judge positive"), ("perplexity", "perplexity (base)"),
           ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("length_words", "words"),
           ("kl", "KL to base")]


def _cell(m: dict, key: str) -> str:
    v, se = m.get(key), m.get(f"{key}_se")
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.3f} ± {Z_95 * se:.3f}" if isinstance(se, (int, float)) else f"{v:.3f}"


def methods_table(methods) -> tuple[list[str], list[list[str]]]:
    """Method x metric on the test prompts (value ± 1.96 se where it has one), train seconds and flags."""
    header = ["method", *[t for _, t in COLUMNS], "train s", "reward hacking?"]
    rows = [[m.name, *[_cell(m.metrics, k) for k, _ in COLUMNS], f"{m.train_seconds:.0f}" if m.run_dir else "-",
             "FLAG: " + "; ".join(m.flags) if m.flags else "no"] for m in methods]
    return header, rows


def check_curve(run_dir: str | None) -> list[tuple[int, float, float]]:
    """(step, eval/kl_mean, eval/reward_mean) of a PPO run's held-out checks (validation prompts), in order."""
    if not run_dir:
        return []
    return [(r["step"], r["eval/kl_mean"], r["eval/reward_mean"]) for r in _read_jsonl(Path(run_dir) / "metrics.jsonl")
            if isinstance(r.get("eval/kl_mean"), (int, float)) and isinstance(r.get("eval/reward_mean"), (int, float))]


def frontier_figure(methods) -> bytes:
    """Left: reward-model score against KL to the base model, every method a point (95% intervals as bars;
    best-of-n at its analytic KL), each PPO run's held-out checks a dashed curve from step 0. Right: the
    independent judge's positive share against the same KL: a method right of the others on the left panel but
    not on the right one is gaming the reward model."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12.0, 4.6), dpi=90, layout="constrained")
    for i, m in enumerate(methods):
        x, colour = m.metrics.get("kl") or 0.0, f"C{i % 10}"
        xerr = Z_95 * m.metrics["kl_se"] if isinstance(m.metrics.get("kl_se"), (int, float)) else None
        marker = "s" if m.name.startswith("best-of") else "o"
        for axis, key in ((ax, "rm_score"), (bx, "judge_positive_share")):
            se = m.metrics.get(f"{key}_se")
            axis.errorbar([x], [m.metrics[key]], yerr=None if se is None else [Z_95 * se], xerr=xerr, fmt=marker,
                          color=colour, capsize=3, label=m.name + (" (FLAG)" if m.flags else ""))
            axis.annotate(m.name, (x, m.metrics[key]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        curve = check_curve(m.run_dir) if "ppo" in m.name else []
        if curve:
            ax.plot([c[1] for c in curve], [c[2] for c in curve], "--", marker=".", color=colour, alpha=0.7,
                    label=f"{m.name} held-out checks (steps {curve[0][0]}-{curve[-1][0]}, validation prompts)")
    ax.set(xlabel="KL to the base model (nats per continuation)", ylabel="reward-model score",
           title="reward-KL frontier (test prompts; dashed: PPO's checks)")
    bx.set(xlabel="KL to the base model (nats per continuation)", ylabel="independent judge: positive share",
           title="the same methods read by the independent judge (VADER)")
    for axis in (ax, bx):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return _png(fig)


def write_rlhf_report(cfg, methods, rm: dict[str, Any], prompts: list[str], out: Path,
                      summary: dict) -> tuple[Path, Path]:
    """Write out/report.html and out/report.md (+ out/report_files/frontier.png)."""
    png = frontier_figure(methods)
    files = out / "report_files"
    files.mkdir(exist_ok=True)
    (files / "frontier.png").write_bytes(png)
    header, rows = methods_table(methods)
    title = f"ppolm RLHF report: {cfg.model}, seed {cfg.seed}"
    acc = rm.get("pairwise_accuracy")
    rm_line = ("Reward model: held-out pairwise accuracy " + (f"{acc:.3f} ± {Z_95 * rm['pairwise_accuracy_se']:.3f}"
               if acc is not None else "-") + f" on {rm.get('pairs')} pairs of sentences no stage trained on.")
    facts = (f"{len(prompts)} held-out test prompts, one sample per prompt at temperature 1 "
             f"({cfg.eval.max_new_tokens} new tokens at most); best-of-n keeps the best of n base samples by the "
             f"reward model, its KL is log n - (n-1)/n. Total wall time {summary['wall_seconds']:.0f} s.")
    flagged = [m for m in methods if m.flags]
    flag_lines = [f"{m.name}: {'; '.join(m.flags)}" for m in flagged] or [
        "no method: none raised the reward-model score clearly while the judge's positive share fell, and none "
        "more than doubled the base model's perplexity"]
    md = [f"# {title}", "", rm_line, "", facts, "", "## Methods on the held-out prompts", "",
          *_md_table(header, rows), "", "## Reward hacking flagged", "", *[f"- {x}" for x in flag_lines], "",
          "## Reward-KL frontier", "", "![frontier](report_files/frontier.png)", "", "## Samples, every method", ""]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
         "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
         "th{background:#f3f3f3}caption{caption-side:bottom;text-align:left;font-size:12px;color:#555}"
         "img{max-width:100%}.s{font-size:12px;white-space:pre-wrap}</style></head><body>",
         f"<h1>{html.escape(title)}</h1><p>{html.escape(rm_line)}</p><p>{html.escape(facts)}</p>",
         "<h2>Methods on the held-out prompts</h2>" + _html_table(header, rows),
         "<h2>Reward hacking flagged</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in flag_lines) + "</ul>",
         "<h2>Reward-KL frontier</h2><img class='plot' alt='reward-KL frontier' src='data:image/png;base64,"
         + base64.b64encode(png).decode("ascii") + "'>",
         "<h2>Samples, every method</h2><table><tr><th>prompt</th>"
         + "".join(f"<th>{html.escape(m.name)}</th>" for m in methods) + "</tr>"]
    for i in range(min(cfg.eval.samples, len(prompts))):
        md += [f"- **prompt**: {prompts[i]!r}", *[f"  - {m.name}: {m.texts[i]!r}" for m in methods]]
        h.append("<tr>" + "".join(f"<td class='s'>{html.escape(x)}</td>"
                                  for x in (prompts[i], *[m.texts[i] for m in methods])) + "</tr>")
    h.append("</table></body></html>")
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text("\n".join(h), encoding="utf-8")
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return html_path, md_path
