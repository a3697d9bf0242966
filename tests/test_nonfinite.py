"""NaN injected into gradients: the optimizer step is skipped (weights, AdamW state and LR schedule untouched) and
counted in optim/nonfinite_skipped_total; optim.max_nonfinite_steps in a row abort the run with TrainingAborted
naming the step, which the CLI reports as one line with exit code 3 (a diverged run, not bad input).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
import kill_harness as kh
from nan_inject import NaNGradients, target_param

from ppolm.config import PPORunConfig, load_config
from ppolm.trainers.ppo import PPOTrainer
from ppolm.update import TrainingAborted

ROOT = Path(__file__).resolve().parents[1]
# 8 rows, minibatches of 4, 2 epochs: 4 optimizer steps per PPO step, one backward each
SMALL = ["log.progress=false", "log.tensorboard=false", "rollout.batch_size=8", "ppo.minibatch_size=4",
         "ppo.epochs=2", "rollout.max_new_tokens=4"]
OPT_PER_STEP = 4


def _trainer(run_dir: Path, *overrides: str) -> PPOTrainer:
    # a random value head: the toy reward is ~0 for the tiny model, so with the default zero head the first
    # steps' gradients are all 0 and no optimizer step would change a weight to tell skipped from taken
    return PPOTrainer(load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [
        *SMALL, f"output_dir={run_dir}", "critic.head_init=normal", *overrides]))


def _snapshot(t: PPOTrainer) -> dict:
    """Everything an optimizer step may change: weights, AdamW moments and step counts, scheduler position."""
    state = {f"param:{n}": p.detach().clone() for n, p in t.actor.named_parameters()}
    for i, s in enumerate(t.optim.optimizer.state.values()):
        state.update({f"adam{i}:{k}": v.detach().clone() for k, v in s.items() if torch.is_tensor(v)})
    state["sched"] = torch.tensor(t.optim.scheduler.last_epoch)
    return state


def _record_steps(t: PPOTrainer) -> list[tuple[bool, dict, dict]]:
    """Wrap optim.step: (skipped, state before, state after) for every optimizer step."""
    log: list[tuple[bool, dict, dict]] = []
    step = t.optim.step

    def recorded(*args, **kwargs):
        before = _snapshot(t)
        result = step(*args, **kwargs)
        log.append((result.skipped, before, _snapshot(t)))
        return result

    t.optim.step = recorded
    return log


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_gradient_step_is_skipped_and_counted(tmp_path):
    t = _trainer(tmp_path, "max_steps=2")
    nan = NaNGradients(target_param(t.actor), {2, 5})  # one in each PPO step
    log = _record_steps(t)
    t.train()
    assert nan.calls == len(log) == 2 * OPT_PER_STEP  # one backward per optimizer step
    assert [i for i, (skipped, _, _) in enumerate(log) if skipped] == [2, 5]
    for i, (skipped, before, after) in enumerate(log):
        if skipped:
            assert _same(before, after), f"optimizer step {i} changed state although skipped"
        else:
            changed = [k for k in before if k.startswith("param:") and not torch.equal(before[k], after[k])]
            assert changed, f"optimizer step {i} changed no weight"
    assert t.optim.steps_done == 2 * OPT_PER_STEP - 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["optim/nonfinite_skipped_total"] for r in rows] == [1.0, 2.0]
    assert all(r["optim/grad_norm"] is not None for r in rows)
    assert all(torch.isfinite(p).all() for p in t.actor.parameters())


def test_non_consecutive_nan_steps_do_not_abort(tmp_path):
    t = _trainer(tmp_path, "max_steps=2", "optim.max_nonfinite_steps=2")
    NaNGradients(target_param(t.actor), {1, 3, 5, 7})  # every other step: never 2 in a row
    t.train()
    assert t.optim.nonfinite_total == 4 and t.optim.nonfinite_in_a_row == 1


def test_k_nan_steps_in_a_row_abort_naming_the_step(tmp_path):
    t = _trainer(tmp_path, "max_steps=3", "optim.max_nonfinite_steps=3")
    NaNGradients(target_param(t.actor), lambda call: call >= 5)  # from the 2nd optimizer step of PPO step 2
    log = _record_steps(t)
    with pytest.raises(TrainingAborted) as info:
        t.train()
    msg = str(info.value)
    assert msg.startswith("step 2: 3 optimizer steps in a row had non-finite gradients"), msg
    assert "\n" not in msg and "max_nonfinite_steps" in msg
    # optimizer steps 5, 6 were skipped without a change; the 3rd NaN (7) raised before returning
    assert [s for s, _, _ in log] == [False] * 5 + [True] * 2
    assert all(_same(before, after) for _, before, after in log[5:])
    assert not (tmp_path / "final").exists()


def test_abort_via_cli_is_one_line_exit_3(tmp_path):
    server = kh.shared_server(optimize=True)
    argv = ["ppo", "--config", str(ROOT / "configs/tiny.yaml"), *SMALL, "max_steps=2", "optim.max_nonfinite_steps=2",
            f"output_dir={tmp_path / 'run'}"]
    job = server.run("cli", argv, tmp_path / "logs", setup="nan_inject:install_always_nan", timeout=300)
    err = job.err().strip()
    assert job.rc == 3, err[-2000:]
    assert err == ("error: step 1: 2 optimizer steps in a row had non-finite gradients; aborting (lower optim.lr, "
                   "check rewards, or raise optim.max_nonfinite_steps)")
    # stdout holds only the start line that says what `gradient_checkpointing: auto` chose (ppolm.plan_report)
    assert [line for line in job.out().splitlines() if line.strip()] == [
        "gradient_checkpointing: auto -> false (the memory plan (ppolm plan) against the memory available; "
        "recorded in config.yaml)"]
