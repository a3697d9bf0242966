"""Held-out evaluation during training, best-checkpoint keeping and guardrails (ppolm/trainers/watch.py)."""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppolm.config import EvalConfig, GuardConfig, PPORunConfig, load_config
from ppolm.errors import ConfigError
from ppolm.tasks.base import Decoding, Example, Task, TaskOptions
from ppolm.trainers.ppo import PPOTrainer
from ppolm.trainers.watch import Watch, label_shares, read_trip

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.progress=false", "log.tensorboard=false"]


class _Exports:
    """Stands in for a trainer's export: records which names were written and when."""

    def __init__(self):
        self.calls = []

    def __call__(self, name):
        self.calls.append(name)


def _watch(tmp_path, guard=None, **eval_kw):
    from ppolm.tasks.toy import ToyTask

    exports = _Exports()
    tmp_path.mkdir(parents=True, exist_ok=True)
    w = Watch(EvalConfig(every=1, **eval_kw), guard or GuardConfig(), ToyTask(), [Example("p")], None, tmp_path,
              autocast=None, seed=0, is_main=True, export=exports, resumed=False)
    return w, exports


def test_label_shares_counts_unlabelled_answers_in_the_denominator():
    preds = [{"reference": g, "scores": {"predicted": p}} for g, p in
             [("a", "a"), ("b", "a"), ("a", "a"), ("b", None)]]
    assert label_shares(preds) == (0.75, 0.5)
    assert label_shares([{"reference": "x", "scores": {}}]) is None


def test_best_is_kept_and_max_drop_stops(tmp_path):
    w, exports = _watch(tmp_path, GuardConfig(max_drop=0.1))
    assert w.observe(1, {"eval/reward_mean": 0.5}) is None
    assert w.observe(2, {"eval/reward_mean": 0.7}) is None          # new best: exported
    assert w.observe(3, {"eval/reward_mean": 0.65}) is None         # 0.05 below best: within max_drop
    trip = w.observe(4, {"eval/reward_mean": 0.55})                 # 0.15 below best
    assert exports.calls == ["best", "best"]
    assert json.loads((tmp_path / "best.json").read_text()) == {"step": 2, "metric": "reward_mean", "value": 0.7,
                                                                "se": None}
    assert trip is not None and trip.step == 4 and trip.best_step == 2 and trip.rolled_back
    assert "0.1500 below its best 0.7000" in trip.reason


def test_collapse_needs_balanced_gold_and_kl_bound(tmp_path):
    w, _ = _watch(tmp_path, GuardConfig(collapse_share=0.8, max_kl=2.0))
    balanced = {"eval/reward_mean": 0.5, "eval/top_gold_share": 0.5}
    assert w.observe(1, {**balanced, "eval/top_pred_share": 0.8}) is None   # at the bound, not past it
    trip = w.observe(2, {**balanced, "eval/top_pred_share": 0.9})
    assert trip is not None and "one label takes 90%" in trip.reason
    skewed = {"eval/reward_mean": 0.5, "eval/top_gold_share": 0.9, "eval/top_pred_share": 0.95}
    assert w.observe(3, skewed) is None                                      # gold itself is one label
    trip = w.observe(4, {"objective/kl": 2.5})                               # no eval this step: KL alone
    assert trip is not None and "guard.max_kl 2.0" in trip.reason


def test_start_is_the_first_best_and_is_never_guarded(tmp_path):
    w, exports = _watch(tmp_path, GuardConfig(collapse_share=0.8, max_drop=0.1))
    collapsed = {"eval/reward_mean": 0.6, "eval/top_gold_share": 0.5, "eval/top_pred_share": 0.95}
    w.evaluate = lambda model, step: dict(collapsed)  # the starting model itself answers one label
    origin = w.start(model=None)
    assert origin is not None and origin["eval/reward_mean"] == 0.6 and "time/eval_task_s" in origin
    assert exports.calls == ["best"] and w.best_step == 0                 # kept, no trip on the start
    trip = w.observe(8, {"eval/reward_mean": 0.4, "eval/top_gold_share": 0.5, "eval/top_pred_share": 0.6})
    assert trip is not None and trip.best_step == 0 and trip.rolled_back  # back to the starting weights
    off, calls = _watch(tmp_path / "off", at_start=False)
    assert off.start(model=None) is None and calls.calls == []


def test_a_drop_within_the_noise_of_the_checks_does_not_stop(tmp_path):
    # 64-row accuracies: se ~0.06 each, so a 0.109 drop is under two standard errors of the difference
    w, _ = _watch(tmp_path, GuardConfig(max_drop=0.1), metric="accuracy")
    assert w.observe(0, {"eval/accuracy": 0.703, "eval/accuracy_se": 0.057}) is None
    assert w.observe(8, {"eval/accuracy": 0.594, "eval/accuracy_se": 0.061}) is None
    # the same drop measured on many more rows is beyond the noise: it stops the run
    w2, _ = _watch(tmp_path / "big", GuardConfig(max_drop=0.1), metric="accuracy")
    w2.observe(0, {"eval/accuracy": 0.703, "eval/accuracy_se": 0.015})
    trip = w2.observe(8, {"eval/accuracy": 0.594, "eval/accuracy_se": 0.016})
    assert trip is not None and "beyond 2 standard errors" in trip.reason
    # z = 0 is the plain comparison of the two numbers
    w3, _ = _watch(tmp_path / "z0", GuardConfig(max_drop=0.1, z=0.0), metric="accuracy")
    w3.observe(0, {"eval/accuracy": 0.703, "eval/accuracy_se": 0.057})
    assert w3.observe(8, {"eval/accuracy": 0.594, "eval/accuracy_se": 0.061}) is not None


def test_a_collapsed_check_never_becomes_the_best(tmp_path):
    # 0.5 with every answer one label beats a weak start of 0.3: it must trip, not become best/
    w, exports = _watch(tmp_path, GuardConfig(collapse_share=0.8), metric="accuracy")
    balanced = {"eval/top_gold_share": 0.5}
    w.observe(0, {**balanced, "eval/accuracy": 0.3, "eval/top_pred_share": 0.6}, guards=False)
    trip = w.observe(8, {**balanced, "eval/accuracy": 0.5, "eval/top_pred_share": 1.0})
    assert trip is not None and "one label takes 100%" in trip.reason
    assert trip.best_step == 0 and w.best_value == 0.3 and exports.calls == ["best"]
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 0


def test_every_process_decides_on_the_main_process_numbers(tmp_path):
    # this process measured a collapse, the main one did not: the main one's numbers decide
    main = {"eval/accuracy": 0.8, "eval/top_pred_share": 0.55, "eval/top_gold_share": 0.5}
    w, _ = _watch(tmp_path, GuardConfig(collapse_share=0.8), metric="accuracy")
    w.agree = lambda metrics: {**metrics, **main}
    here = {"eval/accuracy": 0.5, "eval/top_pred_share": 0.95, "eval/top_gold_share": 0.5, "reward/mean": 1.0}
    assert w.observe(3, here) is None
    assert w.best_value == 0.8 and here["eval/top_pred_share"] == 0.55 and here["reward/mean"] == 1.0


def test_a_resumed_run_drops_a_stale_guard_outcome(tmp_path):
    (tmp_path / "guard.json").write_text("{}")
    (tmp_path / "best.json").write_text(json.dumps({"step": 4, "metric": "reward_mean", "value": 0.5, "se": 0.1}))
    from ppolm.tasks.toy import ToyTask

    w = Watch(EvalConfig(every=1), GuardConfig(), ToyTask(), [Example("p")], None, tmp_path, autocast=None,
              seed=0, is_main=True, export=_Exports(), resumed=True)
    assert not (tmp_path / "guard.json").exists() and read_trip(tmp_path) is None
    assert (w.best_step, w.best_value, w.best_se) == (4, 0.5, 0.1)


def test_lower_is_better_metrics_and_no_rollback_without_best(tmp_path):
    w, _ = _watch(tmp_path, GuardConfig(max_kl=1.0), metric="ter")
    w.observe(1, {"eval/ter": 80.0})
    w.observe(2, {"eval/ter": 60.0})
    assert w.best_value == 60.0 and w.best_step == 2
    w2, _ = _watch(tmp_path / "x", GuardConfig(max_kl=1.0))
    trip = w2.observe(1, {"objective/kl": 3.0})
    assert trip is not None and not trip.rolled_back and "keeps the last weights" in trip.line()


def test_guard_config_is_checked_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="set eval.every > 0"):
        load_config(PPORunConfig, ROOT / "configs/tiny.yaml", ["guard.max_drop=0.1"])
    with pytest.raises(ConfigError, match="eval.keep_best"):
        load_config(PPORunConfig, ROOT / "configs/tiny.yaml", ["eval.every=2", "eval.keep_best=false",
                                                              "guard.collapse_share=0.8"])


# ---- a run that collapses on purpose --------------------------------------------------------------------------
class TwoLabelOptions(TaskOptions):
    n: int = 64
    """Examples (half of each gold label)."""


class TwoLabelTask(Task):
    """Gold labels 'a' / 'b', balanced; the prediction is whichever of the two letters comes first in the
    completion. The reward pays the letter 'a' whatever the gold label: a reward that pays one label, so PPO
    drives every answer to 'a' -- the collapse the guard must catch. Its metric is the recall of 'b'."""

    name = "two-label"
    Options = TwoLabelOptions
    decoding = Decoding(max_new_tokens=8, temperature=0.0)
    primary_metric = "recall_b"

    def load(self, path):
        rng = random.Random(7)
        words = ["sun", "tree", "river", "stone", "cloud", "bird"]
        return [Example(" ".join(rng.choice(words) for _ in range(3)), reference="ab"[i % 2],
                        fields={"label": "ab"[i % 2]}, line=i + 1) for i in range(self.options.n)]

    def reward_functions(self):
        return [(lambda p, c, **f: [sum(ch == "a" for ch in t) / len(t) if t else 0.0 for t in c], 1.0)]

    @staticmethod
    def predicted(text):
        hits = [i for i in (text.find("a"), text.find("b")) if i >= 0]
        return None if not hits else text[min(hits)]

    def metrics(self, examples, completions, **extra):
        gold_b = [self.predicted(c) == "b" for ex, c in zip(examples, completions) if ex.fields["label"] == "b"]
        return {"recall_b": sum(gold_b) / max(len(gold_b), 1), "n": len(completions)}

    def example_scores(self, examples, completions, **extra):
        return [{"predicted": self.predicted(c)} for c in completions]


def test_guard_stops_a_collapsing_run_and_rolls_back_to_the_best_weights_exactly(tmp_path):
    held = TwoLabelTask(n=16).load(None)  # 8 of each gold label: balanced, so one-label answers are a collapse
    common = [*QUIET, "max_steps=24", "eval.every=4", "checkpoint.every=0", "eval.at_start=false"]
    cfg = load_config(PPORunConfig, ROOT / "configs/tiny.yaml",
                      [*common, f"output_dir={tmp_path / 'run'}", "guard.collapse_share=0.7"])
    PPOTrainer(cfg, task=TwoLabelTask(), eval_examples=held).train()
    run = tmp_path / "run"
    trip = read_trip(run)
    assert trip is not None, "the guard never fired"
    assert "one label takes" in trip.reason and trip.rolled_back and trip.step < 24
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == trip.step and rows[-1]["guard/stopped"] == 1.0
    assert rows[-1]["eval/top_pred_share"] > 0.7 >= rows[-1]["eval/top_gold_share"] == 0.5
    best = json.loads((run / "best.json").read_text())
    assert best["step"] == trip.best_step < trip.step
    final, kept = load_file(str(run / "final/model.safetensors")), load_file(str(run / "best/model.safetensors"))
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    # no checkpoint of the stopped step: a resume must not continue from the failure the guard caught
    assert not (run / f"checkpoint-{trip.step}").exists() and not (run / "LATEST").exists()
    # the same run stopped by max_steps at the best step has exactly the rolled-back weights
    cfg2 = load_config(PPORunConfig, ROOT / "configs/tiny.yaml",
                       [*common, f"output_dir={tmp_path / 'short'}", f"max_steps={trip.best_step}"])
    PPOTrainer(cfg2, task=TwoLabelTask(), eval_examples=held).train()
    short = load_file(str(tmp_path / "short/final/model.safetensors"))
    assert all(torch.equal(final[k], short[k]) for k in final)


def test_a_stopped_run_resumes_from_the_last_checkpoint_before_its_best(tmp_path):
    held = TwoLabelTask(n=16).load(None)
    args = [*QUIET, "max_steps=24", "eval.every=4", "checkpoint.every=2", "checkpoint.keep=null",
            "eval.at_start=false", f"output_dir={tmp_path}", "guard.collapse_share=0.7"]
    PPOTrainer(load_config(PPORunConfig, ROOT / "configs/tiny.yaml", args), task=TwoLabelTask(),
               eval_examples=held).train()
    trip = read_trip(tmp_path)
    assert trip is not None and trip.best_step is not None and trip.best_step < trip.step
    left = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert left and max(left) <= trip.best_step  # every checkpoint past the best is gone
    assert (tmp_path / "LATEST").read_text().strip() == f"checkpoint-{max(left)}"
    resumed = PPOTrainer(load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [*args, "resume=true"]),
                         task=TwoLabelTask(), eval_examples=held)
    assert resumed.start_step == max(left) and read_trip(tmp_path) is None  # the stale guard.json is gone


def test_a_run_that_never_beats_its_start_rolls_back_to_the_starting_weights(tmp_path):
    # eval.at_start (default): the start is the first best, so a run that only gets worse returns to it
    held = TwoLabelTask(n=16).load(None)
    cfg = load_config(PPORunConfig, ROOT / "configs/tiny.yaml",
                      [*QUIET, "max_steps=24", "eval.every=4", "checkpoint.every=0", f"output_dir={tmp_path / 'run'}",
                       "guard.collapse_share=0.7"])
    trainer = PPOTrainer(cfg, task=TwoLabelTask(), eval_examples=held)
    start = {k: v.detach().clone() for k, v in trainer.actor.policy.state_dict().items()}
    trainer.train()
    run = tmp_path / "run"
    trip = read_trip(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/recall_b" in rows[0] and "reward/mean" not in rows[0]
    assert trip is not None and trip.rolled_back
    assert trip.best_step == 0  # recall of 'b' only falls as the reward drives answers to 'a'
    final = load_file(str(run / "final/model.safetensors"))  # so final/ holds the starting weights exactly
    assert final.keys() <= start.keys() and all(torch.equal(final[k], start[k]) for k in final)


@pytest.mark.parametrize("kind", ["ppo", "sft"])
def test_a_finished_trainer_is_freed(tmp_path, kind):
    # trainers freeze their set-up out of the cyclic collector while they train; they must unfreeze at the end,
    # or a pipeline running SFT, PPO and SFT->PPO in one process keeps every stage's models (seen: 11 GB peak)
    import gc
    import weakref

    from ppolm.trainers.sft import SFTRunConfig, SFTTrainer

    if kind == "ppo":
        cfg = load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [*QUIET, "max_steps=1", f"output_dir={tmp_path}"])
        trainer = PPOTrainer(cfg)
        model = weakref.ref(trainer.actor.policy)
    else:
        cfg = load_config(SFTRunConfig, ROOT / "configs/sft-tiny.yaml", [*QUIET, "max_steps=1", f"output_dir={tmp_path}"])
        trainer = SFTTrainer(cfg)
        model = weakref.ref(trainer.scorer.lm)
    trainer.train()
    del trainer
    gc.collect()
    assert model() is None
