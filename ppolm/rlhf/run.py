"""`ppolm run CONFIG` with `flow: rlhf`: the RLHF flow on real text, where the goal is a judgement (a reward model
trained on preferences) and no reference text is imitated (Ziegler et al. 2019; Stiennon et al. 2020).

    data      preference pairs and prompts from real labelled sentences (ppolm.data.sentiment_pairs)
    rm        a Bradley-Terry reward model on the training pairs; its pairwise accuracy on held-out pairs
    methods   from the same base model: base; best-of-n (reranked by the reward model); SFT on the chosen
              texts; DPO on the pairs; PPO against the reward model with a KL penalty; SFT->PPO
    evaluate  every method on the same held-out test prompts (ppolm.rlhf.evaluate): reward-model score, the
              independent judge, perplexity under the base model, distinct-1/2, length, KL to the base model
    report    the table, the reward-KL frontier, samples for the same prompts, reward-hacking flags

Deliberately left out: choosing or exporting a model (every method is reported side by side), retries.
Launch: `ppolm run configs/pipeline-rlhf.yaml`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppolm.candidates import _say
from ppolm.config import save_config
from ppolm.data.sentiment_pairs import build_rlhf_data
from ppolm.eval.rlhf_metrics import hacking_flags
from ppolm.eval.run import spread
from ppolm.rlhf.config import RLHFConfig, stage_config, task_options
from ppolm.tasks.base import Decoding, Example


@dataclass
class Method:
    """One evaluated method: its metrics on the test prompts, its completion for each, how long it trained, its
    run directory (held-out checks in metrics.jsonl) and its reward-hacking flags."""

    name: str
    metrics: dict[str, Any]
    texts: list[str]
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    run_dir: str | None = None
    flags: list[str] = field(default_factory=list)


def _flow_task(cfg: RLHFConfig, rm_dir: str, examples: list[Example]):
    """The generation task the SFT and PPO stages see: fixed examples, the reward model as its reward, sampling
    at temperature 1 with eval.max_new_tokens in PPO's held-out checks, KL and perplexity against the base."""
    from ppolm.pipeline import SplitTask
    from ppolm.tasks import build_task

    base = build_task("generation", task_options(cfg, rm_dir))
    base.decoding = Decoding(max_new_tokens=cfg.eval.max_new_tokens, temperature=1.0)
    return SplitTask(base, examples)


def _rm_accuracy(run_dir: Path) -> dict[str, float]:
    """The reward model's last held-out check: eval/pairwise_accuracy, eval/loss, eval/margin (metrics.jsonl)."""
    found: dict[str, float] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        row = json.loads(line)
        if "eval/pairwise_accuracy" in row:
            found = {k[5:]: v for k, v in row.items() if k.startswith("eval/")}
    return found


def run_rlhf(cfg: RLHFConfig) -> dict[str, Any]:
    """Run the flow; returns the headline numbers of every method on the test prompts."""
    from ppolm.eval.intervals import binomial_se
    from ppolm.models import load_model
    from ppolm.pipeline import _train, drop_checkpoints
    from ppolm.rlhf.evaluate import FlowEvaluator, best_of_n, metrics_of
    from ppolm.runtime import autocast_dtype, local_device
    from ppolm.trainers.dpo import train_dpo
    from ppolm.trainers.ppo import train_ppo
    from ppolm.trainers.rm import train_rm
    from ppolm.trainers.sft import train_sft

    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    d = cfg.data
    _say(f"1/5 data: pairs and prompts from {', '.join(d.files)} (seed {cfg.seed})")
    data = build_rlhf_data(d.files, instruction=d.instruction, prompt_words=d.prompt_words,
                           min_rest_words=d.min_rest_words, n_test=d.test_sentences, n_val=d.val_sentences,
                           seed=cfg.seed)
    data.write(out / "data")
    test = spread(data.test_prompts, cfg.eval.limit)
    _say(f"   {len(data.train_pairs)} training pairs, {len(data.val_pairs)} held-out pairs, {len(data.val_prompts)} "
         f"validation prompts, {len(test)} test prompts of {len(data.test_prompts)} (written to {out / 'data'})")
    load_model(cfg.model)  # converts the embedded GGUF once, before any timing starts
    rm_dir = str(out / "rm" / "final")

    _say("2/5 reward model on the training pairs")
    secs, _ = _train(train_rm, stage_config(cfg, "rm", out / "rm", cfg.model, Path(rm_dir)))
    drop_checkpoints(cfg, out / "rm")
    rm = {**_rm_accuracy(out / "rm"), "train_seconds": secs, "pairs": len(data.val_pairs)}
    if "pairwise_accuracy" in rm:
        rm["pairwise_accuracy_se"] = binomial_se(rm["pairwise_accuracy"], len(data.val_pairs))
        _say(f"   held-out pairwise accuracy {rm['pairwise_accuracy']:.3f} on {len(data.val_pairs)} pairs ({secs:.0f} s)")

    sft_task = _flow_task(cfg, rm_dir, [Example(p.prompt, p.chosen) for p in data.train_pairs])
    ppo_task = _flow_task(cfg, rm_dir, [Example(p.prompt, p.rest) for p in data.train_prompts])
    val = [Example(p.prompt, p.rest) for p in data.val_prompts]
    trained: dict[str, tuple[str, float, str]] = {}  # method -> (model dir, train seconds, run dir)

    def stage(method: str, name: str, fn, model: str, **kw) -> None:
        run_dir = out / method
        secs, _ = _train(fn, stage_config(cfg, name, run_dir, model, Path(rm_dir)), **kw)
        drop_checkpoints(cfg, run_dir)
        trained[method] = (str(run_dir / "final"), secs, str(run_dir))
        _say(f"   {method}: {secs:.0f} s")

    _say("3/5 train: " + ", ".join(m for m in ("sft", "dpo", "ppo", "sft_ppo") if cfg.wants(m)))
    if cfg.wants("sft") or cfg.wants("sft_ppo"):
        stage("sft", "sft", train_sft, cfg.model, task=sft_task)
    if cfg.wants("dpo"):
        stage("dpo", "dpo", train_dpo, cfg.model)
    if cfg.wants("ppo"):
        stage("ppo", "ppo", train_ppo, cfg.model, task=ppo_task, eval_examples=val)
    if cfg.wants("sft_ppo"):
        stage("sft_ppo", "ppo", train_ppo, trained["sft"][0], task=ppo_task, eval_examples=val)

    _say(f"4/5 evaluate every method on the same {len(test)} test prompts (temperature 1, "
         f"{cfg.eval.max_new_tokens} new tokens)")
    ev = FlowEvaluator(cfg.model, rm_dir, [p.prompt for p in test], max_new_tokens=cfg.eval.max_new_tokens,
                       batch_size=cfg.eval.batch_size, seed=cfg.seed,
                       autocast=autocast_dtype(cfg.precision, local_device()))
    n_base = max(cfg.eval.best_of) if cfg.wants("best_of_n") else 1
    base = ev.sample(None, n_base)
    methods = [Method("base", metrics_of(base), [t[0] for t in base.texts], eval_seconds=base.seconds)]
    for n in sorted(cfg.eval.best_of) if cfg.wants("best_of_n") else []:
        picked, m = best_of_n(base, n)
        methods.append(Method(f"best-of-{n}", m, [t[0] for t in picked.texts]))
    for name in ("sft", "dpo", "ppo", "sft_ppo"):
        if cfg.wants(name):
            model_dir, secs, run_dir = trained[name]
            s = ev.sample(model_dir)
            methods.append(Method(name, metrics_of(s), [t[0] for t in s.texts], secs, s.seconds, run_dir))
    for m in methods[1:]:
        m.flags = hacking_flags(m.metrics, methods[0].metrics)
    for m in methods:
        _say(f"   {m.name}: {headline(m.metrics)}" + (f"  FLAG: {'; '.join(m.flags)}" if m.flags else ""))

    summary = {"wall_seconds": time.perf_counter() - t_start, "seed": cfg.seed, "model": cfg.model,
               "reward_model": rm, "split": {"train_pairs": len(data.train_pairs), "val_pairs": len(data.val_pairs),
                                             "val_prompts": len(data.val_prompts), "test_prompts": len(test)},
               "methods": {m.name: {"metrics": m.metrics, "train_seconds": m.train_seconds,
                                    "eval_seconds": m.eval_seconds, "flags": m.flags} for m in methods}}
    _say("5/5 report")
    if cfg.report:
        from ppolm.rlhf.report import write_rlhf_report

        summary["report"] = str(write_rlhf_report(cfg, methods, rm, [p.prompt for p in test], out, summary)[0])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"total wall time: {summary['wall_seconds']:.0f} s" + (f"; report: {summary['report']}"
                                                                if "report" in summary else ""))
    return {f"{m.name}/{k}": m.metrics[k] for m in methods for k in ("rm_score", "judge_positive_share")}


def headline(m: dict[str, Any]) -> str:
    """One line of a method's metrics."""
    kl = "-" if m.get("kl") is None else f"{m['kl']:.2f}"
    return (f"RM {m['rm_score']:+.3f}, judge positive {m['judge_positive_share']:.3f}, perplexity "
            f"{m['perplexity']:.2f}, distinct-2 {m['distinct_2']:.3f}, {m['length_words']:.1f} words, KL {kl}")
