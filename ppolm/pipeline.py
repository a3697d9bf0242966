"""`ppolm run PIPELINE.yaml`: the whole flow of the seed.

    preprocess -> load model -> validate base -> SFT and/or PPO (each validated on the same validation rows)
    -> if the target metric is clearly below the bar: adjust by the declared policy (retry PPO with a lower
       learning rate / larger KL coefficient, at most N times)
    -> choose on validation: the best candidate, kept only when clearly better than the base model
    -> export the chosen model (tokenizer, chat template, decoding settings)
    -> test: every candidate on the test split and each extra set, read once, for the report.html / report.md

Every decision (retry, choice) reads the validation rows, taken out of the training split, and compares
numbers only beyond their noise (``ppolm.eval.intervals``); the test split cannot change what is exported.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from ppolm.config import PPORunConfig, Section, TaskConfig, save_config
from ppolm.tasks import Example, Task, build_task
from ppolm.candidates import _say, Candidate, Evaluator, checkpoint_note, choose, clearly_missed, stage_model
from ppolm.eval.intervals import Z_95
from ppolm.eval.run import spread
from ppolm.trainers.common import split_held_out


class StagesConfig(Section):
    sft: bool = True
    """Run direct supervised training on the task's references."""
    ppo: bool = True
    """Run PPO."""
    ppo_from: Literal["base", "sft"] | list[Literal["base", "sft"]] = "base"
    """Start PPO from the base model (an SFT-vs-PPO comparison), from the SFT model (SFT then PPO, the
    recommended recipe), or both ([base, sft]: each is a candidate)."""

    def ppo_starts(self) -> list[str]:
        starts = [self.ppo_from] if isinstance(self.ppo_from, str) else list(dict.fromkeys(self.ppo_from))
        return starts if self.ppo else []

    @model_validator(mode="after")
    def _check_starts(self) -> "StagesConfig":
        if "sft" in self.ppo_starts() and not self.sft:
            raise ValueError("stages.ppo_from: sft needs stages.sft: true")
        return self


class TargetConfig(Section):
    metric: str = "accuracy"
    """Task metric that decides whether the result is good enough (a key of the task's metrics)."""
    min: float | None = None
    """The bar: when the validation value is clearly below it (beyond `z` standard errors), the adjust policy
    runs (null = never adjust)."""
    higher_is_better: bool | None = None
    """False for metrics like TER where lower is better (null = from the metric's name:
    ppolm.eval.intervals.LOWER_IS_BETTER)."""
    z: float = Field(2.0, ge=0.0)
    """A trained candidate replaces the base model as the export only when its validation value is better by
    more than z standard errors of the difference; a retry runs only when the value is below `min` by more than
    z standard errors (0 = plain comparisons)."""

    @model_validator(mode="after")
    def _direction(self) -> "TargetConfig":
        if self.higher_is_better is None:
            from ppolm.eval.intervals import higher_is_better

            self.higher_is_better = higher_is_better(self.metric)
        return self


class AdjustConfig(Section):
    max_retries: int = Field(1, ge=0, le=10)
    """At most this many extra PPO runs when the target is missed."""
    lr_factor: float = Field(0.5, gt=0.0)
    """Each retry multiplies PPO's learning rate by this."""
    kl_factor: float = Field(2.0, gt=0.0)
    """Each retry multiplies PPO's KL coefficient by this."""
    rollback: Literal["best", "last"] = "best"
    """Export the best candidate by the target metric (base included), or the last one trained."""


class EvalStageConfig(Section):
    limit: int | None = Field(None, ge=1)
    """Evaluate on at most this many held-out examples (spread over the split)."""
    batch_size: int = Field(16, ge=1)
    """Prompts per generation batch."""
    extra: dict[str, str | list[str]] = Field(default_factory=dict)
    """More test sets by name, e.g. a domain the training never sees: every candidate is evaluated on each
    (at most `limit` examples, spread over the file)."""
    validation: int = Field(200, ge=0)
    """Rows taken out of the training split for every decision: the stages' own checks during training (their
    eval.every, best checkpoint and guards) and the pipeline's retry and choice of the export, so the test
    split stays unseen until the end (0 = none: then no decision can be taken, and the last stage is exported)."""
    use_best: bool = True
    """Hand on a stage's best/ model (its best validation check) instead of final/ when final/'s last check
    is clearly below it (beyond target.z standard errors); within the noise the trained-longer final/ is kept."""


class PipelineConfig(Section):
    """Configuration of `ppolm run`."""

    model: str = "smollm2-135m-instruct"
    """Model to start from."""
    output_dir: str = "runs/pipeline"
    """Where every stage writes (sft/, ppo/, eval-*/), the export and the report."""
    seed: int = 0
    """Seed of the split and of every stage."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Precision of every stage."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    """The task; eval_fraction of its data is held out for every evaluation (or task.eval_data)."""
    stages: StagesConfig = Field(default_factory=StagesConfig)
    """Which training stages run."""
    sft: dict[str, Any] = Field(default_factory=dict)
    """Keys of `ppolm sft` (model, output_dir, task, seed and precision are set by the pipeline)."""
    ppo: dict[str, Any] = Field(default_factory=dict)
    """Keys of `ppolm ppo` (model, output_dir, task, seed and precision are set by the pipeline)."""
    eval: EvalStageConfig = Field(default_factory=EvalStageConfig)
    """Evaluation settings."""
    target: TargetConfig = Field(default_factory=TargetConfig)
    """The bar the result must reach."""
    adjust: AdjustConfig = Field(default_factory=AdjustConfig)
    """What to do when the bar is missed."""
    report: bool = True
    """Write report.html and report.md."""
    keep_checkpoints: bool = False
    """Keep each finished stage's resumable training checkpoints (checkpoint-N/: weights, optimizer and RNG
    state, ~1.6 GB a stage for the embedded model). The pipeline hands on best/ or final/ and never resumes a
    finished stage, so by default they are deleted once the stage is evaluated; true keeps them for
    `ppolm ppo/sft resume=true max_steps=...`."""

    @model_validator(mode="after")
    def _check_stage_configs(self) -> "PipelineConfig":
        # Validate the nested trainer configs now, so a typo fails before any model loads.
        for name, cls, extra in (("sft", "SFTRunConfig", self.sft), ("ppo", "PPORunConfig", self.ppo)):
            reserved = {"model", "output_dir", "task", "seed", "precision"} & set(extra)
            if reserved:
                raise ValueError(f"{name}.{sorted(reserved)[0]} is set by the pipeline; set it at the top level")
            stage_config(self, name, extra, Path(self.output_dir) / name, self.model)
        return self


def stage_config(cfg: PipelineConfig, name: str, extra: dict, out: Path, model: str):
    """The trainer config of one stage: the pipeline's shared keys + the stage's own keys."""
    if name == "sft":
        from ppolm.trainers.sft import SFTRunConfig as cls
    else:
        cls = PPORunConfig
    data = {"model": model, "output_dir": str(out), "seed": cfg.seed, "precision": cfg.precision,
            "task": {"name": cfg.task.name, "options": cfg.task.options, "eval_fraction": 0.1},
            "overwrite_output_dir": True, **extra}  # a rerun of the pipeline replaces its stages
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        from ppolm.config import format_validation_error

        raise ValueError(format_validation_error(cls, exc, name).replace(f"{name}: key '", f"key '{name}.")) from None


class SplitTask(Task):
    """A task whose `load` returns a fixed list of examples (the pipeline's training split)."""

    def __init__(self, base: Task, examples: list[Example]):
        self.base, self.examples = base, examples
        self.name, self.options = base.name, base.options
        self.system_prompt, self.decoding = base.system_prompt, base.decoding
        self.primary_metric = base.primary_metric

    def load(self, path: str | None) -> list[Example]:
        return list(self.examples)

    def __getattr__(self, attr: str):
        return getattr(self.base, attr)

    def reward_functions(self):
        return self.base.reward_functions()

    def metrics(self, examples, completions, **extra):
        return self.base.metrics(examples, completions, **extra)

    def row_fields(self, examples):
        return self.base.row_fields(examples)


def _train(fn, *args, **kwargs) -> tuple[float, float]:
    """Run one training stage; its wall seconds and the process's peak resident memory (MB) while it ran."""
    from ppolm.runtime import peak_rss_mb, reset_peak_rss

    reset_peak_rss()  # the stages share one process: without this every stage would report the largest so far
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0, peak_rss_mb()


def drop_checkpoints(cfg: PipelineConfig, run_dir: Path) -> None:
    """Delete a finished stage's checkpoint-N/ directories unless keep_checkpoints (best/, final/ stay)."""
    if not cfg.keep_checkpoints:
        for ckpt in run_dir.glob("checkpoint-*"):
            if ckpt.is_dir():
                shutil.rmtree(ckpt)


def finish_stage(cfg: PipelineConfig, c: Candidate, run_dir: Path, total_steps: int):
    """After a training stage is validated: its guard outcome and the checkpoint it handed on go into `c` (and
    one console line), and its resumable checkpoints are dropped. Returns the guard trip, if any."""
    from ppolm.trainers.watch import read_trip

    trip = read_trip(run_dir)
    c.guard = _guard_line(trip)
    c.checkpoint = checkpoint_note(c.model_dir, run_dir, total_steps)
    drop_checkpoints(cfg, run_dir)
    _say(f"   {c.name}: evaluated {c.checkpoint}")
    return trip


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the whole flow; returns the headline numbers (test split)."""
    from ppolm.models import load_model
    from ppolm.trainers.ppo import train_ppo
    from ppolm.trainers.sft import train_sft

    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    task = build_task(cfg.task.name, cfg.task.options)

    _say(f"1/7 preprocess: task {cfg.task.name}, data {cfg.task.data or '(shipped demo set)'}")
    if cfg.task.eval_data:
        train, held = task.load_all(cfg.task.data), task.load_all(cfg.task.eval_data)
    else:
        train, held = split_held_out(task.load_all(cfg.task.data), cfg.task.eval_fraction, cfg.seed)
    train = train[: cfg.task.limit]
    held = spread(held, cfg.eval.limit or cfg.task.eval_limit)
    val: list[Example] = []
    if cfg.eval.validation and len(train) > cfg.eval.validation:
        train, val = split_held_out(train, cfg.eval.validation / len(train), cfg.seed + 1)
    extra = {k: spread(task.load_all(v), cfg.eval.limit) for k, v in cfg.eval.extra.items()}
    sets = "".join(f", {len(v)} in {k}" for k, v in extra.items())
    _say(f"   {len(train)} training, {len(val)} validation and {len(held)} test examples{sets}")
    if not val:
        _say("   no validation rows: no retry or choice can be made, the last stage is exported")
    train_task = SplitTask(task, train)

    _say(f"2/7 load model {cfg.model}")
    load_model(cfg.model)  # converts the embedded GGUF once, before any timing starts
    base_dir = cfg.model
    evaluator = Evaluator(cfg, task, val, held, extra)

    candidates: list[Candidate] = [Candidate("base", base_dir, {}, 0.0, 0.0)]  # validated after the first stage
    references = {"base": None}  # the model each candidate's KL / perplexity is measured against

    def validate_base(run_dir: Path | None) -> None:
        """The base model's validation: the step-0 check of the first stage trained from it, else measured."""
        if not candidates[0].validation:
            candidates[0] = evaluator.validate("base", base_dir, None, 0.0, None if run_dir is None else str(run_dir),
                                               step=0)

    _say("3/7 validate the base model: the step-0 check of the first stage trained from it, on the same rows")

    starts = {"base": base_dir}
    if cfg.stages.sft:
        _say("4/7 SFT (direct supervised training)")
        scfg = stage_config(cfg, "sft", cfg.sft, out / "sft", base_dir)
        secs, peak = _train(train_sft, scfg, task=train_task, eval_examples=val or None)
        validate_base(out / "sft")
        c = evaluator.validate("sft", stage_model(cfg, out / "sft"), base_dir, secs, str(out / "sft"))
        c.train_peak_mb, references["sft"] = peak, base_dir
        finish_stage(cfg, c, out / "sft", scfg.max_steps)
        candidates.append(c)
        starts["sft"] = c.model_dir

    for origin in cfg.stages.ppo_starts():
        ppo_extra, start_dir = dict(cfg.ppo), starts[origin]
        prefix = "ppo" if origin == "base" else "sft-ppo"
        for attempt in range(cfg.adjust.max_retries + 1):
            name = prefix if attempt == 0 else f"{prefix}-retry{attempt}"
            _say(f"5/7 PPO ({name}) from {'the SFT model' if origin == 'sft' else base_dir}")
            pcfg = stage_config(cfg, "ppo", ppo_extra, out / name, start_dir)
            secs, peak = _train(train_ppo, pcfg, task=train_task, eval_examples=val or None)
            validate_base(out / name if origin == "base" else None)
            c = evaluator.validate(name, stage_model(cfg, out / name), start_dir, secs, str(out / name))
            c.train_peak_mb, references[name] = peak, start_dir
            trip = finish_stage(cfg, c, out / name, pcfg.max_steps)
            candidates.append(c)
            if c.guard:
                _say(f"   {c.guard}")
            missed = bool(c.validation) and clearly_missed(c, cfg.target)
            if not missed and trip is None:
                break
            if attempt < cfg.adjust.max_retries:
                # the declared adjust policy: a smaller step and a tighter leash on the reference
                lr = pcfg.optim.lr * cfg.adjust.lr_factor
                kl = max(pcfg.kl.coef, 1e-3) * cfg.adjust.kl_factor
                ppo_extra = {**ppo_extra, "optim": {**ppo_extra.get("optim", {}), "lr": lr},
                             "kl": {**ppo_extra.get("kl", {}), "coef": kl}}
                why = "its guard stopped it" if trip else f"clearly below the bar {cfg.target.min} on validation"
                _say(f"   {why}: retrying PPO with optim.lr={lr:.3g}, kl.coef={kl:.3g}")

    validate_base(None)  # no stage trained from the base model
    chosen = choose(candidates, cfg.target, cfg.adjust.rollback)
    _say(f"6/7 export {chosen.name} (chosen on validation) -> {out / 'export'}")
    export_dir = export_candidate(chosen, task, out / "export", cfg.model)
    _say("7/7 test every candidate (the test split and each extra set, read once, after the choice)")
    for c in candidates:
        evaluator.test(c, references[c.name])
    summary = {
        "chosen": chosen.name, "chosen_on": "validation" if val else "last stage", "export_dir": str(export_dir),
        "target_metric": cfg.target.metric, "target_min": cfg.target.min,
        "wall_seconds": time.perf_counter() - t_start,
        "split": {"train": len(train), "validation": len(val), "test": len(held),
                  **{k: len(v) for k, v in extra.items()}},
        "stages": {c.name: {"metrics": _scalars(c.metrics), "validation": _scalars(c.validation),
                            "train_seconds": c.train_seconds,
                            "train_peak_rss_mb": c.train_peak_mb, "eval_seconds": c.eval_seconds,
                            "model_dir": c.model_dir, "guard": c.guard,
                            "checkpoint": c.checkpoint,
                            "extra": {k: _scalars(v) for k, v in c.extra.items()}} for c in candidates},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.report:
        from ppolm.eval.report import write_report

        paths = write_report(cfg, task, candidates, chosen, out, summary)
        summary["report"] = str(paths[0])
    _print_headline(cfg, candidates, chosen, summary)
    return {f"{c.name}/{cfg.target.metric}": c.metrics.get(cfg.target.metric) for c in candidates}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _guard_line(trip) -> str | None:
    return None if trip is None else trip.line()


def export_candidate(chosen: Candidate, task: Task, dest: Path, base: str) -> Path:
    """Copy the chosen model directory (or save the base model) with tokenizer, chat template, decoding."""
    from ppolm.models import load_model, load_tokenizer
    from ppolm.state_io import atomic_directory, save_json
    from ppolm.tasks.base import DECODING_FILE, decoding_record

    src = Path(chosen.model_dir)
    d = task.decoding
    with atomic_directory(dest) as tmp:  # the old export stays whole until the new one is complete
        if src.is_dir():
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:
            load_model(chosen.model_dir).save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(chosen.model_dir).save_pretrained(tmp)
        save_json(tmp / DECODING_FILE, decoding_record(d, task.system_prompt, task=task.name, stage=chosen.name,
                                                       base_model=base))
    return dest


def _print_headline(cfg: PipelineConfig, candidates: list[Candidate], chosen: Candidate, summary: dict) -> None:
    metric = cfg.target.metric
    sets = list(candidates[0].extra)

    def cell(m: dict) -> str:  # value ± half-width of its 95% interval
        v, se = m.get(metric), m.get(f"{metric}_se")
        return "-" if not isinstance(v, (int, float)) else f"{v:.3f}" + ("" if se is None else f"±{Z_95 * se:.3f}")

    print(f"\n== ppolm run: {metric} (± 95% interval) on validation (the choice), the test split"
          f"{''.join(', ' + k for k in sets)} ==")
    print(f"{'stage':16s} {'validation':>12s} {'test':>12s}" + "".join(f" {k[:14]:>14s}" for k in sets)
          + f" {'train s':>8s} {'peak MB':>8s}")
    for c in candidates:
        print(f"{c.name:16s} {cell(c.validation):>12s} {cell(c.metrics):>12s}"
              + "".join(f" {cell(c.extra.get(k, {})):>14s}" for k in sets)
              + f" {c.train_seconds:8.0f} {'-' if c.train_peak_mb is None else f'{c.train_peak_mb:.0f}':>8s}"
              + ("  (guard stopped it)" if c.guard else ""))
    from ppolm.eval.report import comparisons

    for line in comparisons(candidates, metric, cfg.target.higher_is_better):
        print(line)
    print(f"chosen on {summary['chosen_on']}: {chosen.name}; exported to {summary['export_dir']}")
    if "report" in summary:
        print(f"report: {summary['report']}")
    print(f"total wall time: {summary['wall_seconds']:.0f} s")
