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
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
import kill_harness as kh  # noqa: E402

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
    plan = [("time", rng.random()) for _ in range(4)] + [("checkpoint", rng.uniform(0.0, 0.02)) for _ in range(2)]
    rng.shuffle(plan)
    return plan


def _kill_until_done(server, reference, tmp_path: Path, every: int, seed: int) -> list[kh.Attempt]:
    """Killed-and-resumed runs (fresh directory each) until KILLS_PER_TEST kills happened; each one must end
    identical to the reference and load only complete checkpoints."""
    ref_dir, timing = reference
    rng = random.Random(seed)
    attempts: list[kh.Attempt] = []
    for scenario in range(6):  # a kill drawn past a fast process's end lets it finish: start another
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
