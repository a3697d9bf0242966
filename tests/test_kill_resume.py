"""kill -9 at random moments of tiny PPO runs, resumed until they finish, end bitwise equal to an uninterrupted run.

Every process is a fresh child of tests/scripts/ppo_forkserver.py (so a dozen restarts do not each pay the
torch import). Kill moments are seeded: most are uniform over the killed process's expected life (start-up,
rollout, update, checkpoint writes, pruning, final export), some land inside a checkpoint save (its
`.tmp-checkpoint-*` directory exists). After each kill the test records which checkpoints verify; the next
process must say it resumed from exactly the one the manager should pick, which was complete.
More kills: `python bench/kill_resume.py --kills 100`.
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
import kill_harness as kh

MAX_STEPS = 8
ARGV = [f"max_steps={MAX_STEPS}"]
KILLS_PER_TEST = 6  # two tests: at least 12 kills in the suite


@pytest.fixture(scope="module")
def server() -> kh.ForkServer:
    return kh.shared_server(optimize=True)


@pytest.fixture(scope="module")
def reference(server: kh.ForkServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, kh.Timing]:
    """One uninterrupted run (checkpoint every step) and how long its phases take."""
    run_dir = tmp_path_factory.mktemp("kill") / "reference"
    _, timing = kh.timed_run(server, run_dir, [*ARGV, "checkpoint.every=1"], MAX_STEPS)
    return run_dir, timing


def _plan(rng: random.Random) -> list[tuple[str, float]]:
    """4 kills uniform over a process's life, 2 inside checkpoint writes, in seeded random order."""
    plan = [("time", rng.random()) for _ in range(4)] + [("checkpoint", rng.uniform(0.0, 0.05)) for _ in range(2)]
    rng.shuffle(plan)
    return plan


def _kill_until_done(server, reference, tmp_path: Path, every: int, seed: int) -> list[kh.Attempt]:
    """Killed-and-resumed runs (fresh directory each) until KILLS_PER_TEST kills happened; each one must end
    identical to the reference and load only complete checkpoints."""
    ref_dir, timing = reference
    rng = random.Random(seed)
    attempts: list[kh.Attempt] = []
    # A kill drawn past a fast process's end lets it finish: start another. The kill moments scale with the
    # reference run's timing, which the other pytest-xdist worker's load can inflate several-fold, so allow more
    # runs than kills; each finished run is still compared with the reference.
    for scenario in range(16):
        if sum(a.killed for a in attempts) >= KILLS_PER_TEST:
            break
        run_dir = tmp_path / f"run{scenario}"
        got = kh.run_with_kills(server, run_dir, [*ARGV, f"checkpoint.every={every}"], iter(_plan(rng)), timing,
                                MAX_STEPS)
        report = "\n".join(f"{a.kill} {a.planned_s} rc={a.rc} resumed={a.resumed_from} valid={a.valid_after} "
                           f"latest={a.latest_after} temps={a.temps_after}" for a in got)
        assert kh.check_attempts(got) == [], report
        assert kh.compare_runs(run_dir, ref_dir, MAX_STEPS) == [], report
        attempts += got
    assert sum(a.killed for a in attempts) >= KILLS_PER_TEST
    return attempts


def test_kill9_every_step_checkpoints_resume_to_identical_weights(server, reference, tmp_path):
    attempts = _kill_until_done(server, reference, tmp_path, every=1, seed=1)
    # kills inside a save left a temp dir that the next process removed and never loaded
    assert any(a.killed and a.temps_after for a in attempts)
    assert any(a.stale_removed for a in attempts)
    assert any(a.resumed_from for a in attempts)


def test_kill9_every_other_step_resume_to_identical_weights(server, reference, tmp_path):
    attempts = _kill_until_done(server, reference, tmp_path, every=2, seed=2)
    # with every=2 a resume replays the step after the checkpoint: metrics lines past it were rewritten
    assert all(a.resumed_from is None or a.resumed_from % 2 == 0 or a.resumed_from == MAX_STEPS for a in attempts)
    assert any(a.killed and a.temps_after for a in attempts)


# ---- data order across resumes (in-process) -----------------------------------------------------------------
# 20 prompts, 8 per step: epoch boundaries at positions 20 (inside step 3), 40 (= end of step 5, a checkpoint)
# and 60 (inside step 8).
N_PROMPTS, BATCH, ORDER_STEPS = 20, 8, 8


def _order_cfg(run_dir: Path, *overrides: str):
    from ppolm.config import PPORunConfig, load_config

    return load_config(PPORunConfig, kh.ROOT / "configs/tiny.yaml", [
        "log.progress=false", "log.tensorboard=false", f"output_dir={run_dir}", f"max_steps={ORDER_STEPS}",
        f"task.options.n_prompts={N_PROMPTS}", f"rollout.batch_size={BATCH}", "ppo.minibatch_size=8",
        "ppo.epochs=1", "rollout.max_new_tokens=4", "checkpoint.every=1", "checkpoint.keep=null", *overrides])


def _train_recording(cfg) -> dict[int, list[int]]:
    """Run `cfg`; {0-based step: example indices its rollout used} for the steps this process ran."""
    from ppolm.trainers.ppo import PPOTrainer

    trainer = PPOTrainer(cfg)
    used: dict[int, list[int]] = {}
    rollout = trainer.rollout

    def recording(step: int):
        out = rollout(step)
        used[step] = list(out[2])
        return out

    trainer.rollout = recording
    trainer.train()
    return used


@pytest.fixture(scope="module")
def full_order(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[int]]]:
    run_dir = tmp_path_factory.mktemp("order") / "full"
    return run_dir, _train_recording(_order_cfg(run_dir))


def test_uninterrupted_order_covers_each_epoch_once(full_order):
    _, used = full_order
    positions = [i for step in range(ORDER_STEPS) for i in used[step]]
    assert len(positions) == ORDER_STEPS * BATCH == 64
    for start in range(0, len(positions), N_PROMPTS):
        epoch = positions[start:start + N_PROMPTS]
        if len(epoch) == N_PROMPTS:
            assert sorted(epoch) == list(range(N_PROMPTS))  # every prompt once: none repeated, none skipped
        else:
            assert len(set(epoch)) == len(epoch)  # the last, partial epoch repeats nothing
    assert positions[:N_PROMPTS] != positions[N_PROMPTS:2 * N_PROMPTS]  # each epoch is reshuffled


@pytest.mark.parametrize("resume_at", [5, 2, 6], ids=["epoch-boundary-on-checkpoint", "mid-epoch", "late-mid-epoch"])
def test_resume_reads_the_same_prompts(full_order, tmp_path, resume_at):
    """Resuming at checkpoint-5 (position 40 = an epoch boundary) or mid-epoch (2: position 16, the next step
    crosses the boundary at 20; 6: position 48) uses exactly the rows the uninterrupted run used, and ends in the
    same weights."""
    full_dir, full_used = full_order
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full_dir / f"checkpoint-{resume_at}", part / f"checkpoint-{resume_at}")
    (part / "LATEST").write_text(f"checkpoint-{resume_at}\n")
    used = _train_recording(_order_cfg(part, "resume=true"))
    assert sorted(used) == list(range(resume_at, ORDER_STEPS))
    assert {s: used[s] for s in used} == {s: full_used[s] for s in used}
    assert kh.compare_runs(part, full_dir, ORDER_STEPS) == [f"metrics.jsonl steps are {list(range(resume_at + 1, 9))}"]


class _Killed(BaseException):
    """Stands in for SIGKILL inside a process (nothing after it runs)."""


def test_kill_inside_metrics_rewrite_on_resume_keeps_earlier_steps(tmp_path, monkeypatch):
    from ppolm.trainers.ppo import PPOTrainer

    PPOTrainer(_order_cfg(tmp_path, "max_steps=4", "checkpoint.every=2")).train()
    shutil.rmtree(tmp_path / "checkpoint-4")  # as if the first process died during step 4
    (tmp_path / "LATEST").write_text("checkpoint-2\n")
    import ppolm.state_io as state_io

    replace = state_io.os.replace

    def killed_before_rename(src, dst, *args, **kwargs):
        if Path(dst).name == "metrics.jsonl":
            raise _Killed  # the rewritten log is complete in its temp file; the kill lands before the rename
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(state_io.os, "replace", killed_before_rename)
    with pytest.raises(_Killed):
        PPOTrainer(_order_cfg(tmp_path, "max_steps=4", "checkpoint.every=2", "resume=true")).train()
    monkeypatch.undo()
    PPOTrainer(_order_cfg(tmp_path, "max_steps=4", "checkpoint.every=2", "resume=true")).train()
    assert [r["step"] for r in kh.metrics_rows(tmp_path)] == [1, 2, 3, 4]
