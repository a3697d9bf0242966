"""Configuration of the RLHF flow (`ppolm run` with `flow: rlhf`): the data, the evaluation, and the keys of each
training stage, validated against that stage's own config class before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from ppolm.config import ConfigError, Section, format_validation_error
from ppolm.config_io import parse_override

METHODS = ("base", "best_of_n", "sft", "dpo", "ppo", "sft_ppo")
SHIPPED = [f"data/sentiment_sentences/{d}_labelled.txt" for d in ("amazon_cells", "imdb", "yelp")]
# keys of each trainer the flow sets itself: the shared ones at the top level, the data from its own builder
RESERVED = {"rm": {"model", "output_dir", "seed", "precision", "data", "eval_data"},
            "dpo": {"model", "output_dir", "seed", "precision", "data", "eval_data"},
            "sft": {"model", "output_dir", "seed", "precision", "task"},
            "ppo": {"model", "output_dir", "seed", "precision", "task"}}


class FlowData(Section):
    files: list[str] = Field(default_factory=lambda: list(SHIPPED), min_length=1)
    """`sentence<TAB>0/1` files, one domain each (default: the shipped CC BY Sentiment Labelled Sentences)."""
    instruction: str = "Continue this review: {text}"
    """The user message; {text} is the opening of a real sentence."""
    prompt_words: int = Field(4, ge=1)
    """Words of a sentence that form its opening (the prompt); the rest is its real continuation."""
    min_rest_words: int = Field(3, ge=1)
    """Sentences whose continuation is shorter than this are not used."""
    test_sentences: int = Field(300, ge=1)
    """Sentences held out for the test prompts every method is evaluated on."""
    val_sentences: int = Field(200, ge=0)
    """Sentences held out for the reward model's and DPO's held-out pairs and PPO's held-out checks."""

    @model_validator(mode="after")
    def _check(self) -> "FlowData":
        if "{text}" not in self.instruction:
            raise ValueError("data.instruction must contain {text}")
        return self


class FlowEval(Section):
    limit: int = Field(100, ge=1)
    """Test prompts evaluated (an even spread over them)."""
    max_new_tokens: int = Field(24, ge=1, le=512)
    """Longest continuation in tokens, at evaluation and in PPO's rollouts and checks."""
    best_of: list[int] = Field(default_factory=lambda: [4, 16], min_length=1)
    """The n of best-of-n: n samples of the base model per prompt, the reward model keeps the best."""
    batch_size: int = Field(32, ge=1)
    """Prompts per generation batch."""
    samples: int = Field(6, ge=0)
    """Test prompts shown in the report with every method's continuation."""

    @model_validator(mode="after")
    def _check(self) -> "FlowEval":
        if min(self.best_of) < 2:
            raise ValueError("eval.best_of: every n must be >= 2 (n = 1 is the base model)")
        return self


class RLHFConfig(Section):
    """Configuration of the RLHF flow: pairs from real sentences -> reward model -> base, best-of-n, SFT on the
    chosen texts, DPO, PPO and SFT->PPO, each evaluated on the same held-out prompts -> report."""

    flow: Literal["rlhf"] = "rlhf"
    """Selects this flow in `ppolm run` (without it, `ppolm run` is the task pipeline)."""
    model: str = "smollm2-135m-instruct"
    """The base model every method starts from (and the reward model's initialization)."""
    output_dir: str = "runs/rlhf"
    """Where the data files, every stage, summary.json and the report are written."""
    seed: int = 0
    """Seed of the split and of every stage and sample."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Precision of every stage."""
    methods: list[Literal["base", "best_of_n", "sft", "dpo", "ppo", "sft_ppo"]] = Field(
        default_factory=lambda: list(METHODS))
    """Methods compared (base is always evaluated: every comparison and the reward-hacking flags read it)."""
    data: FlowData = Field(default_factory=FlowData)
    """The sentences, prompts and pairs."""
    eval: FlowEval = Field(default_factory=FlowEval)
    """The evaluation on the test prompts."""
    rm: dict[str, Any] = Field(default_factory=dict)
    """Keys of `ppolm rm` (model, output_dir, seed, precision, data, eval_data are set by the flow)."""
    sft: dict[str, Any] = Field(default_factory=dict)
    """Keys of `ppolm sft` for SFT on the chosen texts and the start of SFT->PPO (the flow sets the task)."""
    dpo: dict[str, Any] = Field(default_factory=dict)
    """Keys of `ppolm dpo` (model, output_dir, seed, precision, data, eval_data are set by the flow)."""
    ppo: dict[str, Any] = Field(default_factory=dict)
    """Keys of `ppolm ppo` for PPO and SFT->PPO (the flow sets the task and reward.model; rollout.temperature
    must stay 1: the KL to the base model and best-of-n's KL are those of sampling at temperature 1)."""
    report: bool = True
    """Write report.html and report.md."""
    keep_checkpoints: bool = False
    """Keep each stage's resumable checkpoint-N/ directories (the flow evaluates final/ and never resumes)."""

    @model_validator(mode="after")
    def _check_stages(self) -> "RLHFConfig":
        for name in ("rm", "sft", "dpo", "ppo"):
            stage_config(self, name, Path(self.output_dir) / name, self.model, Path(self.output_dir) / "rm/final")
        temp = self.ppo.get("rollout", {}).get("temperature", 1.0) if isinstance(self.ppo.get("rollout"), dict) else 1.0
        if temp != 1.0:
            raise ValueError("ppo.rollout.temperature must be 1 in the RLHF flow (its KL and best-of-n's assume it)")
        return self

    def wants(self, method: str) -> bool:
        return method == "base" or method in self.methods


def stage_config(cfg: RLHFConfig, name: str, out: Path, model: str, rm_dir: Path) -> BaseModel:
    """The trainer config of one stage: the stage's keys + what the flow sets (shared keys, data files, task)."""
    from ppolm.config import PPORunConfig
    from ppolm.trainers.dpo import DPORunConfig
    from ppolm.trainers.rm import RMRunConfig
    from ppolm.trainers.sft import SFTRunConfig

    extra = getattr(cfg, name)
    taken = RESERVED[name] & set(extra)
    if taken:
        raise ValueError(f"{name}.{sorted(taken)[0]} is set by the flow")
    data_dir = Path(cfg.output_dir) / "data"
    data: dict[str, Any] = {"model": model, "output_dir": str(out), "seed": cfg.seed, "precision": cfg.precision,
                            "overwrite_output_dir": True}
    if name in ("rm", "dpo"):
        data.update(data=str(data_dir / "train_pairs.jsonl"), eval_data=str(data_dir / "val_pairs.jsonl"))
    else:  # the task object is passed to the trainer; this records what it is
        data["task"] = {"name": "generation", "options": task_options(cfg, str(rm_dir))}
    if name == "ppo":
        rollout = {"max_new_tokens": cfg.eval.max_new_tokens, **extra.get("rollout", {})}
        extra = {**extra, "rollout": rollout, "reward": {**extra.get("reward", {}), "model": str(rm_dir)}}
    cls = {"rm": RMRunConfig, "dpo": DPORunConfig, "sft": SFTRunConfig, "ppo": PPORunConfig}[name]
    try:
        return cls.model_validate({**data, **extra})
    except ValidationError as exc:
        line = format_validation_error(cls, exc, name)  # "ppo: key 'x': ..." -> "key 'ppo.x': ..."
        raise ValueError(line.replace(f"{name}: key '", f"key '{name}.").replace(
            f"{name}: unknown key '", f"unknown key '{name}.")) from None


def task_options(cfg: RLHFConfig, rm_dir: str) -> dict[str, Any]:
    """Options of the generation task the trainers and checks use: the prompts are already instructions, the
    reward is the flow's reward model, KL and perplexity of PPO's held-out checks are against the base model."""
    return {"instruction": "{text}", "reward_model": rm_dir, "reference_model": cfg.model, "reference_words": 0}


def requested_flow(config_path: str | None, overrides: list[str]) -> str | None:
    """The `flow` key of a `ppolm run` config (file, then `flow=...` overrides), None when absent. Read before
    validation: it picks which config class validates the rest."""
    flow = None
    if config_path:
        try:
            raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            raw = None  # load_config reports the unreadable file in its own words
        if isinstance(raw, dict):
            flow = raw.get("flow")
    for item in overrides:
        if item.split("=", 1)[0] == "flow":
            flow = parse_override(item)[1]
    if flow is not None and flow != "rlhf":
        raise ConfigError(f"{config_path or 'override'}: key 'flow': unknown flow {flow!r} (allowed: rlhf; leave it out "
                          "for the task pipeline)")
    return flow
