"""The pipeline decides on validation only, beyond the noise of its numbers (ppolm/candidates.py)."""

import json
from pathlib import Path

import pytest
import torch

from ppolm.candidates import Candidate, choose, clearly_missed, stage_model
from ppolm.config import load_config
from ppolm.pipeline import PipelineConfig, TargetConfig, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
FAST = ["stages.ppo_from=base", "adjust.max_retries=0", "report=false", "sft.max_steps=2", "ppo.max_steps=1"]


def _cand(name, val, se, test=None):
    return Candidate(name, f"dir-{name}", {"accuracy": test} if test is not None else {}, 0.0, 0.0,
                     validation={"accuracy": val, "accuracy_se": se})


def test_choose_reads_validation_and_keeps_the_base_unless_clearly_beaten():
    target = TargetConfig(metric="accuracy")
    base = _cand("base", 0.64, 0.034, test=0.99)
    within = _cand("ppo", 0.70, 0.032, test=0.10)       # +0.06 < 2 x 0.047: within the noise
    assert choose([base, within], target, "best") is base
    clear = _cand("ppo", 0.80, 0.028, test=0.10)        # +0.16 > 2 x 0.044, whatever the test split says
    sft = _cand("sft", 0.78, 0.029, test=1.00)
    assert choose([base, sft, clear], target, "best") is clear
    assert choose([base, sft, clear], target, "last") is clear and choose([base, clear, sft], target, "last") is sft
    assert choose([base, clear], TargetConfig(metric="accuracy", z=0.0), "best") is clear
    # without validation rows no choice can be made: the last stage
    no_val = [Candidate("base", "b", {}, 0, 0), Candidate("sft", "s", {}, 0, 0)]
    assert choose(no_val, target, "best").name == "sft"


def test_retry_only_when_the_bar_is_clearly_missed():
    target = TargetConfig(metric="accuracy", min=0.8)
    assert not clearly_missed(_cand("ppo", 0.75, 0.034), target)   # 0.05 < 2 x 0.034
    assert clearly_missed(_cand("ppo", 0.70, 0.034), target)
    assert not clearly_missed(_cand("ppo", 0.1, 0.01), TargetConfig(metric="accuracy"))
    assert TargetConfig(metric="ter").higher_is_better is False  # the direction comes from the metric's name


def _stage(tmp_path, best_step, best, best_se, last_step, last, last_se):
    run = tmp_path / "run"
    for d in ("best", "final"):
        (run / d).mkdir(parents=True)
        (run / d / "config.json").write_text("{}")
    (run / "best.json").write_text(json.dumps({"step": best_step, "metric": "accuracy", "value": best, "se": best_se}))
    rows = [{"step": best_step, "eval/accuracy": best, "eval/accuracy_se": best_se},
            {"step": last_step, "eval/accuracy": last, "eval/accuracy_se": last_se}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_a_stage_hands_on_best_only_when_final_is_clearly_worse(tmp_path):
    cfg = PipelineConfig()
    run = _stage(tmp_path / "a", 8, 0.85, 0.025, 16, 0.83, 0.026)      # within the noise: final/
    assert stage_model(cfg, run) == str(run / "final")
    run = _stage(tmp_path / "b", 8, 0.85, 0.025, 16, 0.70, 0.032)      # clearly worse: best/
    assert stage_model(cfg, run) == str(run / "best")
    cfg_off = load_config(PipelineConfig, None, ["eval.use_best=false"])
    assert stage_model(cfg_off, run) == str(run / "final")


def test_the_test_split_cannot_change_the_export(tmp_path, monkeypatch):
    """Run the tiny pipeline twice: once as it is, once with test-split numbers that make another candidate
    look far better. The chosen candidate and the exported weights are the same."""
    import ppolm.candidates as cands

    def run(out, rigged):
        real = cands.evaluate_model

        def fake(cfg, task, model_dir, sets, reference, **kw):
            results = real(cfg, task, model_dir, sets, reference, **kw)
            if rigged:  # every test and extra set: the candidate that is not chosen honestly wins by far
                for name, (m, preds, secs) in results.items():
                    if not name.endswith("-validation"):
                        m = {**m, "accuracy": 1.0 if name.startswith("ppo") else 0.0, "accuracy_se": 0.0}
                        results[name] = (m, preds, secs)
            return results

        monkeypatch.setattr(cands, "evaluate_model", fake)
        cfg = load_config(PipelineConfig, ROOT / "configs/pipeline-tiny.yaml", [*FAST, f"output_dir={out}"])
        run_pipeline(cfg)
        return json.loads((out / "summary.json").read_text())

    honest, rigged = run(tmp_path / "honest", False), run(tmp_path / "rigged", True)
    assert rigged["stages"]["ppo"]["metrics"]["accuracy"] == 1.0  # the rigging reached the test numbers
    assert honest["chosen"] == rigged["chosen"] != "ppo"
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "honest/export/model.safetensors"))
    b = load_file(str(tmp_path / "rigged/export/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluations_run_on_the_machine_device(tmp_path, monkeypatch):
    """evaluate_model moves the model to runtime.local_device() and picks autocast for that device (a fake
    'meta' device stands in for a GPU: the model is moved there and evaluate is not run)."""
    import ppolm.candidates as cands
    import ppolm.eval.run
    import ppolm.runtime

    seen = {}
    monkeypatch.setattr(ppolm.runtime, "local_device", lambda: torch.device("meta"))
    monkeypatch.setattr(ppolm.runtime, "autocast_dtype", lambda precision, device: seen.setdefault("amp", device))

    def fake_evaluate(task, model, tok, examples, **kw):
        seen["device"] = next(model.parameters()).device
        raise RuntimeError("stop here")

    monkeypatch.setattr(ppolm.eval.run, "evaluate", fake_evaluate)
    cfg = load_config(PipelineConfig, ROOT / "configs/pipeline-tiny.yaml", [f"output_dir={tmp_path}"])
    from ppolm.tasks import build_task

    task = build_task(cfg.task.name, cfg.task.options)
    with pytest.raises(RuntimeError, match="stop here"):
        cands.evaluate_model(cfg, task, "tiny-random-llama", {"x": task.load_all(None)[:2]}, None)
    assert seen["device"].type == "meta" and seen["amp"].type == "meta"


def test_report_verdicts_count_a_difference_only_beyond_its_noise():
    from ppolm.eval.report import comparisons

    def cand(name, acc, se, unseen):
        c = Candidate(name, name, {"accuracy": acc, "accuracy_se": se}, 0.0, 0.0)
        c.extra = {"unseen": {"accuracy": unseen, "accuracy_se": se}}
        return c

    # SFT->PPO +0.007 / +0.033 over SFT with se ~0.02 each: within the noise, not "better"
    lines = comparisons([cand("sft", 0.920, 0.022, 0.933), cand("sft-ppo", 0.927, 0.021, 0.967),
                         cand("base", 0.68, 0.038, 0.613), cand("ppo", 0.90, 0.025, 0.90)], "accuracy")
    assert lines[0].startswith("PPO vs the base model: +0.220 ± 0.089 accuracy on the test split")
    assert lines[0].endswith("-- better on every set.")
    assert lines[1].endswith("-- not better on any set (every difference within the noise).")
    # without standard errors every positive difference counts, as before
    plain = comparisons([Candidate("base", "b", {"accuracy": 0.5}, 0, 0), Candidate("ppo", "p", {"accuracy": 0.6}, 0, 0)],
                        "accuracy")
    assert plain == ["PPO vs the base model: +0.100 accuracy on the test split -- better on every set."]
