"""Review debts of runs, checkpoints and resume (issue 15, items 11-16): each test failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from ppolm.config import CheckpointConfig, PPORunConfig, load_config
from ppolm.errors import CheckpointError, ConfigError
from ppolm.state_io import atomic_directory
from ppolm.trainers.ppo import PPOTrainer
from ppolm.trainers.ppo_state import load_policy_weights

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["log.progress=false", "log.tensorboard=false", "rollout.batch_size=8", "ppo.minibatch_size=8",
         "ppo.epochs=1", "rollout.max_new_tokens=6", "log.samples_every=1"]


def _cfg(run_dir, *overrides) -> PPORunConfig:
    return load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [*SMALL, f"output_dir={run_dir}", *overrides])


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


# ---- item 11: a default checkpoint interval; SIGTERM/SIGINT save before exiting ---------------------------------
def test_checkpoint_every_has_a_default_interval():
    assert CheckpointConfig().every == 50


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_then_exits_130_and_resumes(tmp_path, sig):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "ppolm.cli", "ppo", "--config", "configs/tiny.yaml", *SMALL, "max_steps=500",
            "checkpoint.every=0", f"output_dir={run}"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "metrics.jsonl").is_file()
                                              and len(_steps(run / "metrics.jsonl")) >= 2):
            time.sleep(0.2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    step = _steps(run / "metrics.jsonl")[-1]
    assert last == (f"error: stopped by {signal.Signals(sig).name} after step {step}: saved checkpoint-{step}; "
                    "continue with resume=true")
    assert (run / f"checkpoint-{step}" / "manifest.json").is_file() and step < 500
    t = PPOTrainer(_cfg(run, f"max_steps={step + 1}", "resume=true"))
    assert t.start_step == step
    t.train()
    assert _steps(run / "metrics.jsonl") == list(range(1, step + 2))


# ---- item 12: a used output_dir is refused unless resume or overwrite ------------------------------------------
def test_fresh_run_into_used_output_dir_is_refused_before_loading(tmp_path, monkeypatch):
    PPOTrainer(_cfg(tmp_path, "max_steps=1")).train()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    import ppolm.trainers.ppo as ppo

    monkeypatch.setattr(ppo, "load_tokenizer", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    with pytest.raises(ConfigError) as info:
        PPOTrainer(_cfg(tmp_path, "max_steps=1"))
    msg = str(info.value)
    assert "\n" not in msg and "already holds a run" in msg and "overwrite_output_dir=true" in msg
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # nothing deleted


def test_overwrite_output_dir_replaces_the_old_run(tmp_path):
    PPOTrainer(_cfg(tmp_path, "max_steps=2", "checkpoint.every=1", "checkpoint.keep=null")).train()
    assert (tmp_path / "checkpoint-1").is_dir()
    PPOTrainer(_cfg(tmp_path, "max_steps=1", "overwrite_output_dir=true")).train()
    assert not (tmp_path / "checkpoint-2").exists() and (tmp_path / "LATEST").read_text() == "checkpoint-1\n"
    assert _steps(tmp_path / "metrics.jsonl") == [1] and _steps(tmp_path / "samples.jsonl") == [1] * 4


def test_cli_refuses_used_output_dir_with_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "ppolm.cli", "ppo", "configs/tiny.yaml", *SMALL, "max_steps=1",
            f"output_dir={tmp_path}"]
    assert subprocess.run(argv, cwd=ROOT, env=env, capture_output=True).returncode == 0
    again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 2, again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith("error: output_dir ")


# ---- item 13: a sharded policy resumes ---------------------------------------------------------------------------
def test_sharded_policy_checkpoint_resumes_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["max_steps=4", "checkpoint.every=2", "checkpoint.keep=null"]

    def sharded(run_dir, *extra):
        t = PPOTrainer(_cfg(run_dir, *common, *extra))
        t.actor.policy.save_pretrained = partial(t.actor.policy.save_pretrained, max_shard_size="100KB")
        return t

    sharded(full).train()
    policy_dir = full / "checkpoint-2" / "policy"
    assert (policy_dir / "model.safetensors.index.json").is_file() and not (policy_dir / "model.safetensors").exists()
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    (part / "LATEST").write_text("checkpoint-2\n")
    sharded(part, "resume=true").train()
    a, b = load_policy_weights(full / "final"), load_policy_weights(part / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- item 14: resume truncates samples.jsonl and TensorBoard events ---------------------------------------------
def test_resume_truncates_samples_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["max_steps=3", "checkpoint.every=1", "checkpoint.keep=null", "log.tensorboard=true"]
    PPOTrainer(_cfg(tmp_path, *common)).train()
    (tmp_path / "LATEST").write_text("checkpoint-1\n")
    shutil.rmtree(tmp_path / "checkpoint-2"), shutil.rmtree(tmp_path / "checkpoint-3")
    PPOTrainer(_cfg(tmp_path, *common, "resume=true")).train()
    assert _steps(tmp_path / "samples.jsonl") == [1] * 4 + [2] * 4 + [3] * 4
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2, 3]


# ---- item 15: changing max_steps on resume ------------------------------------------------------------------------
def test_max_steps_change_on_resume_refused_with_decaying_schedule_allowed_with_constant(tmp_path):
    for schedule, allowed in (("linear", False), ("constant", True)):
        run = tmp_path / schedule
        PPOTrainer(_cfg(run, "max_steps=2", "checkpoint.every=1", f"optim.schedule={schedule}")).train()
        cfg = _cfg(run, "max_steps=4", "resume=true", f"optim.schedule={schedule}")
        if allowed:
            assert PPOTrainer(cfg).start_step == 2
        else:
            with pytest.raises(CheckpointError, match=r"max_steps \(2 -> 4\)"):
                PPOTrainer(cfg)


# ---- item 16: final/ and export/ are written atomically --------------------------------------------------------
def test_atomic_directory_keeps_the_old_directory_on_failure(tmp_path):
    dest = tmp_path / "final"
    with atomic_directory(dest) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(dest) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-export")
    assert (dest / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temp directory left behind
    with atomic_directory(dest) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]


def test_failed_export_leaves_the_previous_final_intact(tmp_path, monkeypatch):
    import ppolm.trainers.common as common
    from ppolm.models import load_model, load_tokenizer
    from ppolm.trainers.ppo_state import load_policy_weights

    model, tok = load_model("tiny-random-llama"), load_tokenizer("tiny-random-llama")
    common.export_model(model, tok, tmp_path / "final")
    before = load_policy_weights(tmp_path / "final")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the weights have moved since the last export
    monkeypatch.setattr(type(tok), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        common.export_model(model, tok, tmp_path / "final")  # fails after the weights were written
    after = load_policy_weights(tmp_path / "final")
    assert all(torch.equal(before[k], after[k]) for k in before)  # not a mix of old and new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_pipeline_reruns_into_its_own_output_dir(tmp_path):
    """The pipeline replaces its stage folders on a rerun (make demo stays rerunnable)."""
    from ppolm.pipeline import PipelineConfig, run_pipeline

    cfg = load_config(PipelineConfig, ROOT / "configs/pipeline-tiny.yaml",
                      [f"output_dir={tmp_path}", "report=false", "ppo.max_steps=2", "sft.max_steps=2"])
    run_pipeline(cfg)
    run_pipeline(cfg)
    assert _steps(tmp_path / "ppo" / "metrics.jsonl") == [0, 1, 2]  # one run's rows (step 0: eval.at_start)
    assert (tmp_path / "export" / "ppolm_decoding.json").is_file()


def test_pipeline_keeps_stage_checkpoints_only_when_asked(tmp_path):
    from ppolm.pipeline import PipelineConfig, run_pipeline

    cfg = load_config(PipelineConfig, ROOT / "configs/pipeline-tiny.yaml",
                      [f"output_dir={tmp_path}", "report=false", "ppo.max_steps=1", "sft.max_steps=1",
                       "keep_checkpoints=true", "stages.ppo_from=sft", "adjust.max_retries=0"])
    run_pipeline(cfg)
    assert (tmp_path / "sft" / "checkpoint-1").is_dir() and (tmp_path / "sft-ppo" / "checkpoint-1").is_dir()
