"""Degenerate batches in tiny PPO runs: no EOS anywhere, empty (EOS-only) completions, one-token completions,
all rewards equal, NaN / inf rewards. Each run must end with finite losses and weights, and each case must be
counted in its metric (reward/nonfinite_count, reward/all_equal, response/*, reward/eos_penalized_count).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
import degenerate_helpers as dh

from ppolm.config import PPORunConfig, load_config
from ppolm.trainers.ppo import PPOTrainer

ROOT = Path(__file__).resolve().parents[1]
B = 8  # rollout.batch_size
STEPS = 2
# Values the update computes from the batch: any NaN here would have reached the weights.
MUST_BE_FINITE = ("loss/policy", "loss/value", "policy/approx_kl", "policy/ratio_mean", "optim/grad_norm", "val/mean",
                  "objective/kl", "reward/score_mean", "policy/entropy")


def _run(run_dir: Path, *overrides: str, reward_fn=None) -> tuple[PPOTrainer, list[dict]]:
    cfg = load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [
        "log.progress=false", "log.tensorboard=false", f"output_dir={run_dir}", f"max_steps={STEPS}",
        f"rollout.batch_size={B}", "rollout.max_new_tokens=4", *overrides])
    trainer = PPOTrainer(cfg, reward_fn=reward_fn)
    trainer.train()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return trainer, rows


def _assert_healthy(trainer: PPOTrainer, rows: list[dict]) -> None:
    """Finite weights (policy and critic), finite update metrics, no skipped optimizer step."""
    bad = [n for n, p in trainer.actor.named_parameters() if not torch.isfinite(p).all()]
    assert bad == []
    for r in rows:
        assert [k for k in MUST_BE_FINITE if r[k] is None or not math.isfinite(r[k])] == [], r["step"]
        assert r["optim/nonfinite_skipped_total"] == 0


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return dh.eos_only_model(tmp_path_factory.mktemp("eos") / "model")


def test_no_eos_anywhere_every_response_penalized(tmp_path):
    trainer, rows = _run(tmp_path, "rollout.min_new_tokens=4", "reward.missing_eos_penalty=-1.0")
    _assert_healthy(trainer, rows)
    for r in rows:
        assert r["response/eos_rate"] == 0.0
        assert r["response/length_mean"] == 4.0
        assert r["reward/eos_penalized_count"] == B
        # the toy reward is in [0, 1]; every score is shifted by the penalty
        assert r["reward/score_mean"] == pytest.approx(r["reward/mean"] - 1.0, abs=1e-6)


def test_empty_completions_from_a_model_that_only_says_eos(tmp_path, eos_model):
    trainer, rows = _run(tmp_path, f"model={eos_model}", "reward.missing_eos_penalty=-1.0", "log.samples_every=1")
    _assert_healthy(trainer, rows)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * STEPS and all(s["completion"] == "" for s in samples)
    for r in rows:
        assert r["response/eos_rate"] == 1.0
        assert r["response/length_mean"] == 1.0  # the EOS token itself is the whole response
        assert r["response/one_token_count"] == B
        assert r["reward/eos_penalized_count"] == 0
        assert r["reward/mean"] == 0.0 and r["reward/all_equal"] == 1.0  # toy reward of "" is 0


def test_empty_completions_are_counted_as_empty(tmp_path, eos_model):
    _, rows = _run(tmp_path, f"model={eos_model}")
    assert all(r["response/empty_count"] == B for r in rows)


def test_one_token_completions(tmp_path):
    trainer, rows = _run(tmp_path, "rollout.max_new_tokens=1", "rollout.min_new_tokens=1",
                         "reward.missing_eos_penalty=-0.5")
    _assert_healthy(trainer, rows)
    for r in rows:
        assert r["response/one_token_count"] == B and r["response/empty_count"] == 0
        assert r["response/length_mean"] == 1.0 and r["response/eos_rate"] == 0.0
        assert r["reward/eos_penalized_count"] == B


def test_all_rewards_equal_with_normalization(tmp_path):
    # through the config path 'module:function' (tests/scripts is on sys.path)
    trainer, rows = _run(tmp_path, "reward.functions=[{name: 'degenerate_helpers:constant_reward', "
                                   "kwargs: {value: 0.7}}]", "reward.normalize=true")
    _assert_healthy(trainer, rows)
    for r in rows:
        assert r["reward/all_equal"] == 1.0
        # float32 mean of equal values is not exact: std is ~1e-8, not 0
        assert r["reward/mean"] == pytest.approx(0.7, abs=1e-6) and r["reward/std"] == pytest.approx(0.0, abs=1e-6)
        assert r["reward/score_mean"] == 0.0  # (x - running mean) / running std with zero variance
    assert trainer.scorer.moments.var == pytest.approx(0.0, abs=1e-12)


def test_nan_and_inf_rewards_are_zeroed_and_counted(tmp_path):
    trainer, rows = _run(tmp_path, "reward.normalize=true", reward_fn=dh.nonfinite_reward)
    _assert_healthy(trainer, rows)
    finite = [0.1 * i for i in range(3, B)]
    for r in rows:
        assert r["reward/nonfinite_count"] == 3
        assert r["reward/all_equal"] == 0.0
        assert r["reward/mean"] == pytest.approx(sum(finite) / len(finite))
    # the running moments saw only the finite scores of both steps
    m = trainer.scorer.moments
    assert m.count == 2 * len(finite) and m.mean == pytest.approx(sum(finite) / len(finite))
    assert math.isfinite(m.var)


def test_all_rewards_nan(tmp_path):
    trainer, rows = _run(tmp_path, "reward.normalize=true", "reward.clip=5", reward_fn=dh.all_nan_reward)
    _assert_healthy(trainer, rows)
    for r in rows:
        assert r["reward/nonfinite_count"] == B
        assert r["reward/mean"] is None  # no finite score: NaN, written as null
        assert r["reward/all_equal"] == 0.0
        assert r["reward/score_mean"] == 0.0
    assert trainer.scorer.moments.count == 0
