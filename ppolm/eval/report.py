"""The pipeline's report: report.html (one self-contained file, images inline) and report.md.

Training curves (the held-out metric with its 95% interval the largest panel, then two panels a row, each
readable at the page's width), ROC curves with AUC and confusion matrices (classification), a table of task
metrics for base / SFT / PPO side by side with the wall time each took (a metric with a standard error as
value ± 95% interval), and sample outputs before and after.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402

from ppolm.eval.intervals import Z_95, diff_se  # noqa: E402

CURVES = [("reward/mean", "reward"), ("objective/kl", "KL to reference"), ("policy/entropy", "entropy"),
          ("response/length_mean", "response length"), ("loss/value", "value loss")]
HEADLINE_METRICS = ["accuracy", "f1_macro", "roc_auc", "f1", "micro_f1", "bleu", "chrf", "ter", "reward_mean",
                    "kl_mean", "distinct_2", "perplexity", "invalid_rate", "top_label_share"]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


DPI = 90
CURVES_WIDTH_IN = 12.0  # 1080 px at DPI: the report's 1100 px column shows it unscaled, two panels of ~470 px a row


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def training_curves(candidates, metric: str | None = None) -> bytes | None:
    """The training curves as a PNG (see :func:`curves_figure`); None when no run logged any."""
    fig = curves_figure(candidates, metric)
    return None if fig is None else _png(fig)


def curves_figure(candidates, metric: str | None = None):
    """The held-out `metric` measured during training (eval/<metric> of every run that logged it, shaded
    +-Z_95 x eval/<metric>_se where logged) across the top, the largest panel; below it, two a row, the SFT
    loss and one panel per PPO curve (every PPO run overlaid). A run has the same colour in every panel."""
    runs = [(c.name, _read_jsonl(Path(c.run_dir) / "metrics.jsonl")) for c in candidates if c.run_dir]
    colour = {name: f"C{i % 10}" for i, (name, _) in enumerate(runs)}
    ppo_runs = [(name, rows) for name, rows in runs if "ppo" in name]
    panels = [(k, f"PPO {t}", ppo_runs) for k, t in CURVES if any(k in r for _, rows in ppo_runs for r in rows)]
    sft_runs = [(name, rows) for name, rows in runs if name == "sft" and any("loss/sft" in r for r in rows)]
    panels = [("loss/sft", "SFT loss", sft_runs)] * bool(sft_runs) + panels
    eval_key = f"eval/{metric}"
    eval_runs = [(name, rows) for name, rows in runs if any(r.get(eval_key) is not None for r in rows)]
    if not panels and not eval_runs:
        return None
    cols = 2 if len(panels) > 1 or eval_runs else 1
    rows_below = -(-len(panels) // cols)
    top = [1.5] if eval_runs else []
    fig = plt.figure(figsize=(CURVES_WIDTH_IN if cols == 2 else CURVES_WIDTH_IN / 2, 4.2 * bool(eval_runs)
                              + 2.9 * rows_below), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(len(top) + rows_below, cols, height_ratios=top + [1.0] * rows_below)
    if eval_runs:
        _held_out_panel(fig.add_subplot(grid[0, :]), eval_runs, eval_key, metric, colour)
    for i, (key, title, curve_runs) in enumerate(panels):
        ax = fig.add_subplot(grid[len(top) + i // cols, i % cols])
        for name, rows in curve_runs:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), color=colour[name], label=name)
        _style(ax, title)
        if len(curve_runs) > 1:
            ax.legend(fontsize=8)
    return fig


def _held_out_panel(ax, eval_runs, eval_key: str, metric: str | None, colour: dict[str, str]) -> None:
    banded = stopped = False
    for name, rows in eval_runs:
        pts = [(r["step"], r[eval_key], r.get(f"{eval_key}_se")) for r in rows if r.get(eval_key) is not None]
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(steps, values, marker="o", markersize=4, color=colour[name], label=name)
        if all(isinstance(p[2], (int, float)) for p in pts):
            lo, hi = [v - Z_95 * p[2] for v, p in zip(values, pts)], [v + Z_95 * p[2] for v, p in zip(values, pts)]
            ax.fill_between(steps, lo, hi, color=colour[name], alpha=0.08, linewidth=0)
            for edge in (lo, hi):  # overlaid bands blur into one tint: their edges say whose band ends where
                ax.plot(steps, edge, color=colour[name], linestyle="--", linewidth=0.8, alpha=0.7)
            banded = True
        for step in [r["step"] for r in rows if r.get("guard/stopped")]:
            ax.axvline(step, color=colour[name], linestyle=":", linewidth=1.5)
            stopped = True
    notes = ["shaded: 95% interval"] * banded + ["dotted: a guard stopped the run"] * stopped
    _style(ax, f"held-out {metric} during training" + (f" ({'; '.join(notes)})" if notes else ""), size=11)
    ax.legend(fontsize=9, ncols=min(len(eval_runs), 6))


def _style(ax, title: str, size: int = 10) -> None:
    ax.set_title(title, fontsize=size)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def roc_figure(candidates) -> bytes | None:
    """ROC curves of every stage (one panel per stage, one line per class) with their AUC."""
    stages = [c for c in candidates if c.metrics.get("roc_curves")]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(3.4 * len(stages), 3.2), squeeze=False)
    for ax, c in zip(axes[0], stages):
        per_class = c.metrics.get("roc_auc_per_class") or {}
        for label, curve in c.metrics["roc_curves"].items():
            if curve:
                auc = per_class.get(label)
                ax.plot(curve["fpr"], curve["tpr"], label=f"{label} (AUC {auc:.3f})" if auc is not None else label)
        ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        auc = c.metrics.get("roc_auc")
        ax.set_title(f"{c.name}: ROC-AUC {auc:.3f}" if isinstance(auc, float) else c.name, fontsize=9)
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def confusion_figure(candidates) -> bytes | None:
    stages = [c for c in candidates if c.metrics.get("confusion_matrix")]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(3.0 * len(stages), 3.0), squeeze=False)
    for ax, c in zip(axes[0], stages):
        cm, labels = c.metrics["confusion_matrix"], c.metrics.get("labels") or []
        ax.imshow(cm, cmap="Blues")
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"{c.name} (rows: true)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def _cell(metrics: dict[str, Any], key: str) -> str:
    # a value with its standard error beside it (key_se) reads as value ± half-width of its 95% interval
    v, se = metrics.get(key), metrics.get(f"{key}_se")
    if isinstance(v, (int, float)) and isinstance(se, (int, float)):
        return f"{v:.3f} ± {Z_95 * se:.3f}"
    return _fmt(v)


INTERVAL_CAPTION = "value ± h: a 95% normal interval, h = 1.96 standard errors over the rows"


def metrics_table(candidates, extra_set: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Stage x headline metric on the test split, or on the named extra set (then without the timings); a
    metric with its standard error beside it (`<metric>_se`) as 'value ± 1.96 se'."""
    def of(c):
        return c.metrics if extra_set is None else c.extra.get(extra_set, {})

    keys = [k for k in HEADLINE_METRICS if any(isinstance(of(c).get(k), (int, float)) for c in candidates)]
    timing = ["train s", "train peak MB", "eval s"] if extra_set is None else []
    header = ["stage", *keys, *timing]

    def peak(c) -> str:
        return "-" if c.train_peak_mb is None else f"{c.train_peak_mb:.0f}"

    rows = [[c.name, *[_cell(of(c), k) for k in keys],
             *([f"{c.train_seconds:.0f}", peak(c), f"{c.eval_seconds:.0f}"] if extra_set is None else [])]
            for c in candidates]
    return header, rows


def comparisons(candidates, metric: str, higher_is_better: bool = True, z: float = 2.0) -> list[str]:
    """Plain sentences: each RL stage against where it started (PPO vs base, SFT->PPO vs SFT), on the test
    split and on every extra set, each difference with its 95% interval (where the metrics carry a standard
    error); a difference counts as better or worse only beyond z standard errors of the difference, and the
    sentence says outright when it is not better anywhere."""
    by_name = {c.name: c for c in candidates}
    lines = []
    for name, start, label in (("ppo", "base", "PPO vs the base model"), ("sft-ppo", "sft", "SFT->PPO vs SFT")):
        if name not in by_name or start not in by_name:
            continue
        a, b = by_name[name], by_name[start]
        diffs = []
        for set_name, of in [("test split", lambda c: c.metrics), *[(k, lambda c, k=k: c.extra.get(k, {}))
                                                                     for k in a.extra]]:
            x, y = of(a).get(metric), of(b).get(metric)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                se = diff_se(of(a).get(f"{metric}_se"), of(b).get(f"{metric}_se"))
                diffs.append((set_name, (x - y) if higher_is_better else (y - x), se))
        if not diffs:
            continue
        text = ", ".join((f"{d:+.3f}" + (f" ± {Z_95 * se:.3f}" if se else "")
                          + (f" {metric} on the {n}" if n == "test split" else f" on {n}")) for n, d, se in diffs)
        better = [d > z * se for _, d, se in diffs]
        worse = [-d > z * se for _, d, se in diffs]
        verdict = ("better on every set" if all(better) else
                   "not better on any set" if not any(better) and any(worse) else
                   "not better on any set (every difference within the noise)" if not any(better) else
                   "better on some sets only")
        lines.append(f"{label}: {text} -- {verdict}.")
    return lines


def _has_intervals(rows: list[list[str]]) -> bool:
    return any(" ± " in cell for row in rows for cell in row)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    caption = ["", f"{INTERVAL_CAPTION}."] if _has_intervals(rows) else []
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows], *caption]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    caption = f"<caption>{html.escape(INTERVAL_CAPTION)}</caption>" if _has_intervals(rows) else ""
    return (f"<table>{caption}<tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in rows) + "</table>")


def samples(candidates, chosen, n: int = 6) -> list[dict]:
    """The first n held-out examples with every candidate's completion side by side (base first; the chosen
    model is one of the columns). -> [{prompt, reference, outputs: {stage: completion}}]."""
    base = candidates[0]
    out = []
    for i in range(min(n, len(base.predictions))):
        b = base.predictions[i]
        outputs = {c.name: (c.predictions[i].get("completion", "") if i < len(c.predictions) else "")
                   for c in candidates}
        out.append({"prompt": b.get("prompt", ""), "reference": b.get("reference"), "outputs": outputs})
    return out


def _bar(minimum, sign: str) -> str:
    return f"{sign} {minimum}" if minimum is not None else "(no bar set: target.min is null)"


def write_report(cfg, task, candidates, chosen, out: Path, summary: dict) -> tuple[Path, Path]:
    """Write out/report.html and out/report.md (+ out/report_files/*.png for the markdown)."""
    figures = {"training curves": training_curves(candidates, cfg.target.metric), "ROC curves": roc_figure(candidates),
               "confusion matrices": confusion_figure(candidates)}
    header, rows = metrics_table(candidates)
    examples = samples(candidates, chosen)
    title = f"ppolm report: {cfg.task.name} on {cfg.model}"
    files = out / "report_files"
    files.mkdir(exist_ok=True)

    up = cfg.target.higher_is_better
    md = [f"# {title}", "", f"Chosen model: **{chosen.name}** (exported to `{summary['export_dir']}`); target "
          f"`{cfg.target.metric}` {_bar(cfg.target.min, '>=' if up else '<=')}. "
          f"Total wall time {summary['wall_seconds']:.0f} s.", "",
          "## Task metrics on the held-out split", "", *_md_table(header, rows), ""]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
         "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
         "th{background:#f3f3f3}caption{caption-side:bottom;text-align:left;font-size:12px;color:#555;padding-top:4px;white-space:nowrap}"
         "img{max-width:100%}.s{font-size:12px;white-space:pre-wrap}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>",
         f"<p>Chosen model: <b>{html.escape(chosen.name)}</b>, exported to <code>{html.escape(summary['export_dir'])}"
         f"</code>. Target <code>{html.escape(cfg.target.metric)}</code> "
         f"{html.escape(_bar(cfg.target.min, '≥' if up else '≤'))}. "
         f"Total wall time {summary['wall_seconds']:.0f} s.</p>",
         "<h2>Task metrics on the held-out split</h2>" + _html_table(header, rows)]
    for set_name in (candidates[0].extra if candidates else {}):
        eh, er = metrics_table(candidates, set_name)
        md += [f"## Task metrics on {set_name}", "", *_md_table(eh, er), ""]
        h.append(f"<h2>Task metrics on {html.escape(set_name)}</h2>" + _html_table(eh, er))
    verdicts = comparisons(candidates, cfg.target.metric, cfg.target.higher_is_better)
    if verdicts:
        md += ["## What RL added", "", *[f"- {v}" for v in verdicts], ""]
        h.append("<h2>What RL added</h2><ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in verdicts) + "</ul>")
    points = [(c.name, c.checkpoint) for c in candidates if c.checkpoint]
    if points:
        md += ["## Checkpoints evaluated", "", *[f"- {name}: {note}" for name, note in points], ""]
        h.append("<h2>Checkpoints evaluated</h2><ul>" + "".join(
            f"<li><b>{html.escape(n)}</b>: {html.escape(p)}</li>" for n, p in points) + "</ul>")
    guards = [(c.name, c.guard) for c in candidates if c.guard]
    if guards:
        md += ["## Guardrails", "", *[f"- {name}: {line}" for name, line in guards], ""]
        h.append("<h2>Guardrails</h2><ul>" + "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(g)}</li>"
                                                      for n, g in guards) + "</ul>")
    for name, png in figures.items():
        if png is None:
            continue
        fname = name.replace(" ", "_") + ".png"
        (files / fname).write_bytes(png)
        heading = name[0].upper() + name[1:]  # "ROC curves" keeps its capitals
        md += [f"## {heading}", "", f"![{name}](report_files/{fname})", ""]
        b64 = base64.b64encode(png).decode("ascii")
        h.append(f"<h2>{html.escape(heading)}</h2><img class='plot' alt='{html.escape(name)}' "
                 f"src='data:image/png;base64,{b64}'>")
    names = [c.name for c in candidates]
    md += ["## Sample outputs, every stage", ""]
    h.append("<h2>Sample outputs, every stage</h2><table><tr><th>prompt</th><th>reference</th>"
             + "".join(f"<th>{html.escape(n)}{' (chosen)' if n == chosen.name else ''}</th>" for n in names) + "</tr>")
    for ex in examples:
        short = ex["prompt"][:300] + ("..." if len(ex["prompt"]) > 300 else "")
        md += [f"- **prompt**: {short!r}", f"  - reference: {ex['reference']!r}",
               *[f"  - {n}: {ex['outputs'][n]!r}" for n in names]]
        h.append("<tr>" + "".join(f"<td class='s'>{html.escape(str(x))}</td>"
                                  for x in (short, ex["reference"], *[ex["outputs"][n] for n in names])) + "</tr>")
    h.append("</table></body></html>")
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text("\n".join(h), encoding="utf-8")
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return html_path, md_path
