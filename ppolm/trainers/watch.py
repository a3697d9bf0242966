"""Held-out evaluation during training, best-checkpoint keeping and guardrails (shared by SFT and PPO).

Before the first step (``eval.at_start``), every ``eval.every`` steps and at the last step the model decodes
a fixed, evenly spread set of held-out examples with the task's own decoding and metric; the numbers are
logged as ``eval/<metric>``.
Each check also logs its standard error (``eval/<metric>_se``: binomial for accuracy, bootstrap otherwise; see
``ppolm.eval.intervals``). When the watched metric reaches a new best (and the check did not trip the collapse
guard), the model is exported to ``output_dir/best`` (with ``best.json``: step, metric, value, se). The guard
stops a run when

* the watched metric falls more than ``guard.max_drop`` below its best so far *and* more than ``guard.z``
  standard errors of that difference (a dip within the noise of the check does not stop a run),
* one predicted label takes more than ``guard.collapse_share`` of the held-out predictions while no gold
  label does (the "answers one label to everything" failure), or
* the sampled KL to the reference passes ``guard.max_kl`` (PPO, checked every step),

then rolls back: ``final/`` becomes a copy of ``best/``, and ``guard.json`` records what happened. No peer
framework (TRL, OpenRLHF, verl) ships this; it is what a careful user does by hand after a bad run.

Every process evaluates the same examples (the forward passes are collective under FSDP2 and ZeRO-3), but
the numbers can differ in the last bits between processes; the main process's numbers are broadcast
(``agree``) before any decision, so every process keeps the same best and stops at the same step.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ppolm.config import EvalConfig, GuardConfig
from ppolm.errors import ConfigError
from ppolm.eval.intervals import clearly_below, higher_is_better
from ppolm.eval.run import evaluate, spread
from ppolm.state_io import atomic_directory, save_json
from ppolm.tasks.base import Example, Task


@dataclass(frozen=True)
class GuardTrip:
    """Why and when a run was stopped, and what it was rolled back to."""

    step: int
    reason: str
    best_step: int | None
    best_value: float | None
    metric: str
    rolled_back: bool = False

    def line(self) -> str:
        back = (f"final/ rolled back to step {self.best_step} ({self.metric} {self.best_value:.4f})"
                if self.rolled_back else "final/ keeps the last weights")
        return f"guard stopped the run at step {self.step}: {self.reason}; {back}"


def label_shares(predictions: Sequence[dict]) -> tuple[float, float] | None:
    """(share of the most frequent predicted label, share of the most frequent gold label) over predictions
    whose scores name a predicted label (classification); None for tasks without labels. A prediction that
    names no label counts in the denominator, not as a label."""
    rows = [p for p in predictions if isinstance(p.get("scores"), dict) and "predicted" in p["scores"]]
    if not rows:
        return None
    pred = Counter(p["scores"]["predicted"] for p in rows if p["scores"]["predicted"] is not None)
    gold = Counter(p["reference"] for p in rows)
    return (pred.most_common(1)[0][1] / len(rows) if pred else 0.0), gold.most_common(1)[0][1] / len(rows)


class Watch:
    """eval/guard of one run. `due` says when to evaluate, `evaluate` measures, `observe` keeps the best and
    returns a GuardTrip when a guard fires, `rollback` makes final/ the best model."""

    def __init__(self, eval_cfg: EvalConfig, guard: GuardConfig, task: Task, examples: Sequence[Example],
                 tokenizer: PreTrainedTokenizerBase, output_dir: str | Path, *, autocast: torch.dtype | None,
                 seed: int, is_main: bool, export: Callable[[str], Path | None], resumed: bool,
                 agree: Callable[[dict], dict] | None = None, reference: PreTrainedModel | None = None):
        self.cfg, self.guard, self.task, self.tokenizer = eval_cfg, guard, task, tokenizer
        self.examples = spread(list(examples), eval_cfg.limit)
        self.metric = eval_cfg.metric or task.primary_metric
        self.higher = higher_is_better(self.metric)
        self.sign = 1.0 if self.higher else -1.0
        self.out, self.autocast, self.seed, self.is_main, self.export = Path(output_dir), autocast, seed, is_main, export
        self.agree = agree or (lambda metrics: metrics)
        self.best_value: float | None = None
        self.best_se: float | None = None
        self.best_step: int | None = None
        # the task's reference model: the trainer's own when it is that model (a second copy of the weights cost
        # the RLHF flow's PPO stage an OOM kill), else loaded at the first check
        self._ref: PreTrainedModel | None = reference
        best = self.out / "best.json"
        if is_main:
            # A fresh run must not inherit an earlier run's best; no run, fresh or resumed, inherits a guard
            # outcome: a resumed run starts from a checkpoint before the trip (train_loop drops later ones).
            (self.out / "guard.json").unlink(missing_ok=True)
            if not resumed:
                (self.out / "best.json").unlink(missing_ok=True)
                shutil.rmtree(self.out / "best", ignore_errors=True)
        if resumed and best.is_file():  # a resumed run keeps the best it had found
            state = json.loads(best.read_text(encoding="utf-8"))
            if state.get("metric") == self.metric:
                self.best_value, self.best_step = float(state["value"]), int(state["step"])
                self.best_se = state.get("se")

    def _reference(self, model: PreTrainedModel) -> PreTrainedModel | None:
        """The task's `reference_model` option (generation), loaded once on the model's device: the checks' KL
        and perplexity are then against it (the RLHF flow's curve of KL to the base model); None without one."""
        name = getattr(getattr(self.task, "options", None), "reference_model", None)
        if not name or not getattr(self.task, "needs_reference_scores", False):
            return None
        if self._ref is None:
            from ppolm.models import load_model

            self._ref = load_model(name).to(next(model.parameters()).device)
            self._ref.requires_grad_(False)
            self._ref.eval()
        return self._ref

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.every) and bool(self.examples)

    def due(self, done: int, total: int) -> bool:
        """True after step `done` (1-based) when an evaluation is scheduled."""
        return self.enabled and (done % self.cfg.every == 0 or done == total)

    @torch.no_grad()
    def evaluate(self, model: PreTrainedModel, step: int) -> dict[str, float | str]:
        """The task's metrics on the held-out examples as eval/<name> (scalars only), the watched metric's
        standard error as eval/<metric>_se, plus eval/top_pred_share and eval/top_gold_share for label tasks.
        The model's train/eval mode is kept."""
        was_training = model.training
        try:
            result = evaluate(self.task, model, self.tokenizer, self.examples, batch_size=self.cfg.batch_size,
                              autocast=self.autocast, seed=self.seed, label_scores=False, se_metrics=[self.metric],
                              reference_model=self._reference(model))
        finally:
            model.train(was_training)
        out: dict[str, float | str] = {f"eval/{k}": float(v) for k, v in result.metrics.items()
                                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
        shares = label_shares(result.predictions)
        if shares is not None:
            out["eval/top_pred_share"], out["eval/top_gold_share"] = shares
        if f"eval/{self.metric}" not in out:
            have = ", ".join(k[5:] for k in out)
            raise ConfigError(f"eval.metric '{self.metric}' is not a metric of task {self.task.name} (have: {have})")
        return out

    def start(self, model: PreTrainedModel) -> dict[str, float | str] | None:
        """Before the first step of a fresh run (eval.at_start): measure the starting model as step 0 and keep
        it as the first best, so the curve has its origin and a rollback can return to the start. No guard is
        checked on it: the starting model is what the run is measured against. Returns the eval/* metrics."""
        if not (self.enabled and self.cfg.at_start):
            return None
        t0 = time.perf_counter()
        metrics = self.evaluate(model, 0)
        metrics["time/eval_task_s"] = time.perf_counter() - t0
        self.observe(0, metrics, guards=False)
        return metrics

    def after_step(self, done: int, total: int, model: Callable[[], PreTrainedModel],
                   metrics: dict[str, float | str]) -> GuardTrip | None:
        """The loop's hook after step `done`: evaluate when due (adding eval/* and time/eval_task_s to `metrics`),
        then `observe`; a trip is recorded in `metrics` as guard/stopped and guard/reason."""
        if self.due(done, total):
            t0 = time.perf_counter()
            metrics.update(self.evaluate(model(), done))
            metrics["time/eval_task_s"] = time.perf_counter() - t0
        trip = self.observe(done, metrics)
        if trip is not None:
            metrics.update({"guard/stopped": 1.0, "guard/reason": trip.reason})
        return trip

    def observe(self, step: int, metrics: dict[str, float | str], guards: bool = True) -> GuardTrip | None:
        """After step `step`: check the collapse guard, keep a new best (export best/), check the drop and KL
        guards (no guard when `guards` is False). Returns the trip, if any. `metrics` are first replaced by
        the main process's (`agree`), so that every process decides the same."""
        metrics.update(self.agree({k: v for k, v in metrics.items() if k.startswith(("eval/", "objective/kl"))}))
        g = self.guard if guards else GuardConfig()
        value, se = metrics.get(f"eval/{self.metric}"), metrics.get(f"eval/{self.metric}_se")
        if isinstance(value, float):
            # Collapse first: a model answering one label to everything must not become best/ even when it
            # happens to beat a weak start (0.5 at 100% one label against 0.3), or a rollback would restore it.
            share, gold_share = metrics.get("eval/top_pred_share"), metrics.get("eval/top_gold_share")
            if (g.collapse_share is not None and isinstance(share, float) and isinstance(gold_share, float)
                    and share > g.collapse_share >= gold_share):
                return self._trip(step, f"one label takes {share:.0%} of the held-out predictions "
                                        f"(gold at most {gold_share:.0%}; guard.collapse_share {g.collapse_share})")
            if self.best_value is None or self.sign * (value - self.best_value) > 0:
                self.best_value, self.best_se, self.best_step = value, se, step
                if self.cfg.keep_best:
                    self.export("best")
                    if self.is_main:
                        save_json(self.out / "best.json", {"step": step, "metric": self.metric, "value": value,
                                                           "se": se})
            elif g.max_drop is not None and clearly_below(value, se, self.best_value, self.best_se,
                                                          higher=self.higher, margin=g.max_drop, z=g.z):
                drop = self.sign * (self.best_value - value)
                return self._trip(step, f"held-out {self.metric} {value:.4f} is {drop:.4f} below its best "
                                        f"{self.best_value:.4f} (step {self.best_step}; guard.max_drop {g.max_drop}, "
                                        f"beyond {g.z:g} standard errors of the difference)")
        kl = metrics.get("objective/kl")
        if g.max_kl is not None and isinstance(kl, float) and kl > g.max_kl:
            return self._trip(step, f"KL to the reference {kl:.3f} nats passed guard.max_kl {g.max_kl}")
        return None

    def _trip(self, step: int, reason: str) -> GuardTrip:
        can = self.guard.rollback and self.cfg.keep_best and self.best_step is not None
        return GuardTrip(step, reason, self.best_step, self.best_value, self.metric, rolled_back=can)

    def rollback(self, trip: GuardTrip) -> None:
        """final/ := best/ when the trip allows it; write guard.json; one line on the console."""
        if self.is_main:
            if trip.rolled_back:  # swapped in whole: there is never a moment without a loadable final/
                with atomic_directory(self.out / "final") as tmp:
                    shutil.copytree(self.out / "best", tmp, dirs_exist_ok=True)
            save_json(self.out / "guard.json", asdict(trip))
            print(f"[ppolm] {trip.line()}", flush=True)


def read_trip(output_dir: str | Path) -> GuardTrip | None:
    """The guard outcome a run left in output_dir (None when no guard fired)."""
    path = Path(output_dir) / "guard.json"
    return GuardTrip(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None
