"""Resume refuses a run whose config or data changed (naming what changed), proceeds with a warning under
allow_changed_resume=true, ignores keys that do not change the computation, and falls back from a damaged
newest checkpoint to the previous one with one line saying so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppolm.cli import main
from ppolm.config import PPORunConfig, load_config
from ppolm.errors import CheckpointError
from ppolm.trainers.ppo import PPOTrainer

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["log.progress=false", "log.tensorboard=false", "rollout.batch_size=8", "rollout.max_new_tokens=4",
         "ppo.epochs=1", "checkpoint.keep=null"]


def _cfg(run_dir: Path, *overrides: str) -> PPORunConfig:
    return load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [*SMALL, f"output_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step toy run with checkpoints 1 and 2 (copied per test, never modified)."""
    run_dir = tmp_path_factory.mktemp("guard") / "run"
    PPOTrainer(_cfg(run_dir, "max_steps=2", "checkpoint.every=1")).train()
    return run_dir


def _copy(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


def _cli(run_dir: Path, *overrides: str) -> list[str]:
    return ["ppo", "--config", str(ROOT / "configs/tiny.yaml"), *SMALL, f"output_dir={run_dir}", "resume=true",
            "max_steps=3", *overrides]


def test_changed_config_refused_naming_the_key(finished, tmp_path, capfd):
    run_dir = _copy(finished, tmp_path)
    rc = main(_cli(run_dir, "ppo.clip_eps=0.1", "kl.coef=0.02"))
    _, err = capfd.readouterr()
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot resume from" in err and "checkpoint-2" in err
    assert "kl.coef (0.01 -> 0.02)" in err and "ppo.clip_eps (0.2 -> 0.1)" in err
    assert "allow_changed_resume=true" in err
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run_dir / "checkpoint-3").exists()


def test_changed_config_proceeds_with_warning_when_allowed(finished, tmp_path, capsys):
    run_dir = _copy(finished, tmp_path)
    trainer = PPOTrainer(_cfg(run_dir, "resume=true", "max_steps=3", "ppo.clip_eps=0.1", "allow_changed_resume=true"))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "resuming from" in warnings[0] and "ppo.clip_eps (0.2 -> 0.1)" in warnings[0]
    assert "resumed from checkpoint-2 (step 2)" in out
    assert trainer.start_step == 2
    trainer.train()
    assert (run_dir / "checkpoint-3").is_dir()


def test_volatile_keys_do_not_block_resume(finished, tmp_path, capsys):
    """max_steps, output_dir, log.* and checkpoint.* do not change what is computed."""
    run_dir = _copy(finished, tmp_path)
    trainer = PPOTrainer(_cfg(run_dir, "resume=true", "max_steps=3", "checkpoint.every=3", "log.every=2"))
    out = capsys.readouterr().out
    assert "warning" not in out and trainer.start_step == 2


def _generation_run(run_dir: Path, data: Path, *overrides: str) -> PPORunConfig:
    return _cfg(run_dir, "task.name=generation", f"task.data={data}", "task.options={instruction: '{text}'}",
                "max_steps=1", *overrides)


def test_changed_data_refused_then_allowed(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(8)))
    run_dir = tmp_path / "run"
    PPOTrainer(_generation_run(run_dir, data)).train()
    data.write_text(data.read_text().replace("prompt number 5", "prompt number five"))  # same path, new text
    with pytest.raises(CheckpointError) as info:
        PPOTrainer(_generation_run(run_dir, data, "resume=true", "max_steps=2"))
    msg = str(info.value)
    assert "training data changed" in msg and "config changed" not in msg and "\n" not in msg
    capsys.readouterr()
    trainer = PPOTrainer(_generation_run(run_dir, data, "resume=true", "max_steps=2", "allow_changed_resume=true"))
    out = capsys.readouterr().out
    assert "warning: resuming from" in out and "training data changed" in out
    assert trainer.start_step == 1


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside the tensor data, past the safetensors header
    path.write_bytes(bytes(raw))


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    run_dir = tmp_path / "run"
    PPOTrainer(_cfg(run_dir, "max_steps=4", "checkpoint.every=2")).train()
    original = load_file(run_dir / "final/model.safetensors")
    _flip_byte(run_dir / "checkpoint-4/policy/model.safetensors")
    capsys.readouterr()
    trainer = PPOTrainer(_cfg(run_dir, "max_steps=4", "checkpoint.every=2", "resume=true"))
    lines = capsys.readouterr().out.splitlines()
    said = [line for line in lines if "damaged" in line]
    expected = "checkpoint-4 is damaged (policy/model.safetensors: checksum mismatch); falling back to checkpoint-2"
    assert said == [expected], lines
    assert "resumed from checkpoint-2 (step 2)" in lines
    assert trainer.start_step == 2
    trainer.train()
    # steps 3-4 were redone from checkpoint-2 exactly: the same final weights as before the damage
    redone = load_file(run_dir / "final/model.safetensors")
    assert original.keys() == redone.keys() and all(torch.equal(original[k], redone[k]) for k in original)


def test_keys_added_after_the_checkpoint_at_their_default_are_not_a_change(tmp_path):
    """A checkpoint written before `algo.estimator` / `kl.in` / `rollout.samples_per_prompt` existed resumes
    under the defaults (the computation is the one it did) and is refused when the new key changes it."""
    from ppolm.trainers.resume import check_same_run, config_fingerprint

    cfg = _cfg(tmp_path)
    old = {k: v for k, v in config_fingerprint(cfg).items()
           if k not in ("algo.estimator", "kl.in", "rollout.samples_per_prompt")}
    state = {"config": old, "data": "d", "world_size": 1}
    check_same_run(state, tmp_path, config=cfg, data_fp="d", world_size=1, allow_changed=False, is_main=True)
    rpp = _cfg(tmp_path, "algo.estimator=reinforce_pp")  # (grpo would need samples_per_prompt >= 2)
    with pytest.raises(CheckpointError, match=r"algo.estimator \(null -> \"reinforce_pp\"\)"):
        check_same_run(state, tmp_path, config=rpp, data_fp="d", world_size=1, allow_changed=False, is_main=True)
