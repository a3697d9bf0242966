"""The pipeline's candidates: how each is evaluated (validation rows while the pipeline decides, the test
split once at the end), which checkpoint a stage hands on, and which candidate is exported.

Every decision here reads validation numbers and acts on a difference only beyond its noise
(``ppolm.eval.intervals.clearly_below``): a stage hands on best/ only when final/ is clearly worse, a trained
candidate replaces the base model only when clearly better, a retry runs only when the bar is clearly missed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppolm.config import ConfigError
from ppolm.eval.intervals import clearly_below, interval
from ppolm.tasks import Example, Task

if TYPE_CHECKING:
    from ppolm.pipeline import PipelineConfig, TargetConfig


def _say(msg: str) -> None:
    print(f"[ppolm run] {msg}", flush=True)


@dataclass
class Candidate:
    """One evaluated model: where it is, its metrics on the validation rows (every decision) and on the test
    split (and on each extra set; filled once, at the end), how long its training took, its predictions, and
    what its guard did."""

    name: str
    model_dir: str
    metrics: dict[str, Any]
    train_seconds: float
    eval_seconds: float
    predictions: list[dict] = field(default_factory=list)
    run_dir: str | None = None
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    guard: str | None = None
    checkpoint: str | None = None  # which of the stage's checkpoints was evaluated, e.g. "best/ = step 16 of 16"
    train_peak_mb: float | None = None  # peak resident memory of the process during the training stage
    validation: dict[str, Any] = field(default_factory=dict)  # metrics on the validation rows (decisions)


def evaluate_model(cfg: PipelineConfig, task: Task, model_dir: str, sets: dict[str, list[Example]],
                   reference: str | None, label_scores: bool = True) -> dict[str, tuple[dict, list[dict], float]]:
    """Evaluate one model (loaded once, on this machine's device) on each named set of examples, with the
    target metric's standard error; writes eval-<name>/metrics.json and predictions.jsonl per set.
    label_scores=False skips the label-word probabilities (ROC-AUC): the decisions need only the answers.
    Returns {name: (metrics, predictions, seconds)}."""
    from ppolm.eval.run import evaluate
    from ppolm.models import load_model, load_tokenizer
    from ppolm.runtime import autocast_dtype, local_device

    device = local_device()
    model, tok = load_model(model_dir).to(device), load_tokenizer(model_dir)
    ref = (load_model(reference).to(device) if reference and getattr(task, "needs_reference_scores", False)
           else None)
    amp = autocast_dtype(cfg.precision, device)
    results = {}
    for name, examples in sets.items():
        t0 = time.perf_counter()
        result = evaluate(task, model, tok, examples, batch_size=cfg.eval.batch_size, autocast=amp,
                          reference_model=ref, seed=cfg.seed, progress=True, se_metrics=[cfg.target.metric],
                          label_scores=label_scores)
        out = Path(cfg.output_dir) / f"eval-{name}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result.metrics, indent=2, default=str))
        with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
            for p in result.predictions:
                f.write(json.dumps(p, ensure_ascii=False, default=str) + "\n")
        results[name] = (result.metrics, result.predictions, time.perf_counter() - t0)
    return results


def _value(metrics: dict[str, Any], target: TargetConfig) -> tuple[float, float | None]:
    """(value, standard error) of the target metric in one evaluation's metrics."""
    v = metrics.get(target.metric)
    if not isinstance(v, (int, float)):
        raise ConfigError(f"target.metric '{target.metric}' is not a metric of this task "
                          f"(have: {', '.join(k for k, x in metrics.items() if isinstance(x, (int, float)))})")
    return float(v), metrics.get(f"{target.metric}_se")


def clearly_missed(c: Candidate, target: TargetConfig) -> bool:
    """The candidate's validation value is below target.min beyond its noise (always False without a bar)."""
    if target.min is None:
        return False
    value, se = _value(c.validation, target)
    return clearly_below(value, se, target.min, None, higher=target.higher_is_better, z=target.z)


def choose(candidates: list[Candidate], target: TargetConfig, rollback: str) -> Candidate:
    """The model to export, read on validation only: the last one trained (rollback: last, or no validation
    rows), else the best by the target metric, kept only when it is clearly better than the first candidate
    (the base model) beyond target.z standard errors of the difference."""
    if rollback == "last" or not candidates[0].validation:
        return candidates[-1]
    sign = 1.0 if target.higher_is_better else -1.0
    base = candidates[0]
    best = max(candidates, key=lambda c: sign * _value(c.validation, target)[0])
    if best is not base and clearly_below(*_value(base.validation, target), *_value(best.validation, target),
                                          higher=target.higher_is_better, z=target.z):
        return best
    return base


class Evaluator:
    """Evaluates every candidate the same way: on the validation rows when it is made (`validate`, what every
    decision reads), and on the test split and each extra set once, after the export is chosen (`test`)."""

    def __init__(self, cfg: PipelineConfig, task: Task, val: list[Example], test: list[Example],
                 extra: dict[str, list[Example]]):
        self.cfg, self.task, self.val, self.test_set, self.extra = cfg, task, val, test, extra

    def validate(self, name: str, model_dir: str, reference: str | None, train_seconds: float,
                 run_dir: str | None = None, step: int | None = None) -> Candidate:
        """The candidate with its validation metrics. A training stage already measured the model it hands on
        (its check at `step`, or at the step of the handed-on best/ or final/) on these same rows: those
        numbers are taken from its metrics.jsonl; only a model without such a check is evaluated here."""
        c = Candidate(name, model_dir, {}, train_seconds, 0.0, run_dir=run_dir)
        took = f" ({train_seconds:.0f} s training)" if train_seconds > 0 else ""
        if not self.val:
            return c
        logged = None
        if run_dir is not None:
            at = step if step is not None else handed_step(Path(run_dir), model_dir)
            logged = None if at is None else logged_check(Path(run_dir), at, len(self.val))
        metric = self.cfg.target.metric
        if logged is not None and metric in logged:
            c.validation, where = logged, f" (the stage's check at step {at})"
        else:
            m, _, secs = evaluate_model(self.cfg, self.task, model_dir, {f"{name}-validation": self.val},
                                        reference, label_scores=False)[f"{name}-validation"]
            c.validation, c.eval_seconds, where = m, secs, ""
        m = c.validation
        _say(f"   {name}: {metric} {interval(m.get(metric), m.get(metric + '_se'))} on {len(self.val)} "
             f"validation rows{where}{took}")
        return c

    def test(self, c: Candidate, reference: str | None) -> None:
        """Fill the candidate's test-split metrics and predictions and its extra sets' metrics."""
        sets = {c.name: self.test_set, **{f"{c.name}-{k}": v for k, v in self.extra.items()}}
        results = evaluate_model(self.cfg, self.task, c.model_dir, sets, reference)
        c.metrics, c.predictions, secs = results.pop(c.name)
        for set_name in self.extra:
            c.extra[set_name] = results[f"{c.name}-{set_name}"][0]
        c.eval_seconds += secs + sum(r[2] for r in results.values())
        metric = self.cfg.target.metric
        more = "".join(f", {k} {interval(v.get(metric), v.get(metric + '_se'))}" for k, v in c.extra.items())
        _say(f"   {c.name}: {metric} {interval(c.metrics.get(metric), c.metrics.get(metric + '_se'))} on the "
             f"test split{more}")


def last_check(run_dir: Path, metric: str) -> tuple[int, float, float | None] | None:
    """(step, value, se) of the last held-out check of `metric` in a stage's metrics.jsonl, or None."""
    path, found = run_dir / "metrics.jsonl", None
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if isinstance(row.get(f"eval/{metric}"), (int, float)):
                found = (int(row["step"]), float(row[f"eval/{metric}"]), row.get(f"eval/{metric}_se"))
    return found


def logged_check(run_dir: Path, step: int, n: int) -> dict[str, Any] | None:
    """The metrics (eval/ prefix dropped) of the held-out check a stage logged at `step`, when it covered n
    rows; None without one."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("step") == step and row.get("eval/n") == n:
            return {k[5:]: v for k, v in row.items() if k.startswith("eval/")}
    return None


def handed_step(run_dir: Path, model_dir: str) -> int | None:
    """The training step whose weights `model_dir` (a stage's best/ or final/) holds, where a check measured it."""
    if Path(model_dir) == run_dir / "best" and (run_dir / "best.json").is_file():
        return int(json.loads((run_dir / "best.json").read_text(encoding="utf-8"))["step"])
    if Path(model_dir) == run_dir / "final":
        from ppolm.trainers.watch import read_trip

        if read_trip(run_dir) is None and (last := last_check(run_dir, "n")) is not None:
            return last[0]  # the watch always checks the last step: final/ holds that step's weights
    return None


def stage_model(cfg: PipelineConfig, run_dir: Path) -> str:
    """The model a stage hands on: best/ when kept and wanted and the last check (final/'s) is clearly below
    the best one (beyond target.z standard errors of the difference), else final/. A best that is ahead only
    within the noise is not worth the steps it throws away (and its lead is partly the luck of being the max)."""
    best, final = run_dir / "best", run_dir / "final"
    if not (cfg.eval.use_best and (best / "config.json").is_file() and (run_dir / "best.json").is_file()):
        return str(final)
    b = json.loads((run_dir / "best.json").read_text(encoding="utf-8"))
    from ppolm.trainers.watch import read_trip

    last = last_check(run_dir, b["metric"])
    if last is None or last[0] == b["step"] or read_trip(run_dir) is not None:
        return str(best)  # the best is the last check, or a guard already rolled final/ back to it
    from ppolm.eval.intervals import higher_is_better

    worse = clearly_below(last[1], last[2], b["value"], b.get("se"), higher=higher_is_better(b["metric"]),
                          z=cfg.target.z)
    return str(best if worse else final)


def checkpoint_note(model_dir: str, run_dir: Path, total_steps: int) -> str:
    """Which checkpoint of a stage was evaluated (`model_dir`, from `stage_model`): best/ with its step and
    validation value, or final/. A best at step 0 means no check during training beat the starting model, so
    the stage hands on the start."""
    best = run_dir / "best.json"
    if not best.is_file():
        return "final/"
    b = json.loads(best.read_text(encoding="utf-8"))
    if Path(model_dir) != run_dir / "best":
        return (f"final/ (its last check is within the noise of the best, step {b['step']}: validation "
                f"{b['metric']} {interval(b['value'], b.get('se'))})")
    start = ": no check beat the starting model" if b["step"] == 0 else ""
    return f"best/ = step {b['step']} of {total_steps} (validation {b['metric']} {interval(b['value'], b.get('se'))}){start}"
