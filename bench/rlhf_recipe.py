"""Choose the RLHF flow's PPO recipe on validation: train only the PPO stage of an existing flow run (its data/ and
rm/final, so every variant sees the same prompts and the same reward model) with config overrides, then evaluate
the result on the run's **validation** prompts (never its test prompts) with the flow's own evaluator: reward-model
score, the independent judge (VADER), perplexity and KL under the base model, distinct-2.

    python bench/rlhf_recipe.py --run runs/rlhf-s1 --out runs/recipe/s1-rloo \
        ppo.algo.estimator=rloo ppo.rollout.batch_size=4 ppo.rollout.samples_per_prompt=4

`--base` also evaluates the base model on the same prompts (the reference row). Prints one line per model and
writes summary.json in --out. The flow config is the run's own config.yaml; the overrides are flow keys.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished `flow: rlhf` run directory (config.yaml, data/, rm/)")
    p.add_argument("--out", required=True, help="where the PPO stage and summary.json go")
    p.add_argument("--limit", type=int, default=96, help="validation prompts evaluated (an even spread)")
    p.add_argument("--base", action="store_true", help="also evaluate the base model")
    p.add_argument("--trained", help="evaluate this already trained model directory instead of training one "
                   "(e.g. the run's own ppo/final: the shipped recipe's row); overrides then change nothing")
    p.add_argument("--ppo-seed", type=int, help="the PPO stage's own seed (its sampling and value-head init; "
                   "default: the run's): the same recipe and reward model again, to measure one run's noise")
    p.add_argument("overrides", nargs="*", help="flow config overrides, e.g. ppo.kl.coef=0.1")
    args = p.parse_args(argv)

    from ppolm.config_io import load_config
    from ppolm.data.sentiment_pairs import build_rlhf_data
    from ppolm.eval.run import spread
    from ppolm.pipeline import _train
    from ppolm.rlhf.config import RLHFConfig, stage_config
    from ppolm.rlhf.evaluate import FlowEvaluator, metrics_of
    from ppolm.rlhf.run import _flow_task, headline
    from ppolm.runtime import autocast_dtype, local_device
    from ppolm.tasks.base import Example
    from ppolm.trainers.ppo import train_ppo

    run, out = Path(args.run), Path(args.out)
    cfg = load_config(RLHFConfig, run / "config.yaml", args.overrides)
    rm_dir = str(run / "rm" / "final")
    d = cfg.data  # the run's split again: build_rlhf_data is a function of the files and the seed
    data = build_rlhf_data(d.files, instruction=d.instruction, prompt_words=d.prompt_words,
                           min_rest_words=d.min_rest_words, n_test=d.test_sentences, n_val=d.val_sentences,
                           seed=cfg.seed)
    written = (run / "data" / "val_prompts.jsonl").read_text(encoding="utf-8").splitlines()
    if [json.loads(x)["prompt"] for x in written] != [x.prompt for x in data.val_prompts]:
        raise SystemExit(f"{run}/data/val_prompts.jsonl differs from the split its config.yaml makes")
    train, val = data.train_prompts, data.val_prompts
    task = _flow_task(cfg, rm_dir, [Example(x.prompt, x.rest) for x in train])
    t0 = time.perf_counter()
    if not args.trained:
        stage = stage_config(cfg, "ppo", out, cfg.model, Path(rm_dir))
        if args.ppo_seed is not None:
            stage = stage.model_copy(update={"seed": args.ppo_seed})
        _train(train_ppo, stage, task=task,
               eval_examples=[Example(x.prompt, x.rest) for x in val])
    secs = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)

    prompts = [x.prompt for x in spread(val, args.limit)]
    ev = FlowEvaluator(cfg.model, rm_dir, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                       batch_size=cfg.eval.batch_size, seed=cfg.seed,
                       autocast=autocast_dtype(cfg.precision, local_device()))
    rows = {"ppo": metrics_of(ev.sample(args.trained or str(out / "final")))}
    if args.base:
        rows = {"base": metrics_of(ev.sample(None)), **rows}
    for name, m in rows.items():
        print(f"{name}: {headline(m)}  (judge se {m['judge_positive_share_se']:.3f}, n {m['n']})")
    summary = {"overrides": args.overrides, "ppo_seed": args.ppo_seed, "trained": args.trained,
               "train_seconds": secs, "split": "validation", "methods": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
