"""End-to-end PPO on tiny models: learning, exact resume, LoRA reference, critic variants, processes."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, launches, run_launcher
import torch
from safetensors.torch import load_file

from ppolm.config import PPORunConfig, load_config
from ppolm.trainers.actor_critic import reference_logprobs
from ppolm.trainers.ppo import PPOTrainer

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.progress=false", "log.tensorboard=false"]


def _cfg(tmp_path, *overrides):
    return load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [*QUIET, f"output_dir={tmp_path}", *overrides])


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_config_learns_within_a_minute(tmp_path):
    start = time.perf_counter()
    PPOTrainer(_cfg(tmp_path)).train()
    elapsed = time.perf_counter() - start
    rewards = [m["reward/mean"] for m in _metrics(tmp_path)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, (first, last)
    assert elapsed < 60
    names = set(_metrics(tmp_path)[0])
    documented = (ROOT / "docs/metrics.md").read_text()
    for name in names - {"step"}:
        assert f"`{name}`" in documented, f"{name} missing from docs/metrics.md"
    final = tmp_path / "final"
    assert (final / "model.safetensors").is_file() and (final / "ppolm_decoding.json").is_file()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final) is not None
    assert (tmp_path / "config.yaml").is_file()


def _resume_equal(tmp_path, *overrides):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["max_steps=6", "checkpoint.every=3", "checkpoint.keep=null", "optim.schedule=linear",
              "optim.warmup_steps=2", "reward.normalize=true", "kl.adaptive=true", "kl.target=1.0", *overrides]
    PPOTrainer(_cfg(full, *common)).train()
    part.mkdir()
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")
    (part / "LATEST").write_text("checkpoint-3\n")
    # a killed run leaves log lines past its last checkpoint: resume must drop them and write them anew
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")
    resumed = PPOTrainer(_cfg(part, *common, "resume=true"))
    has_critic = resumed.estimator.needs_critic
    resumed.train()
    compared = 0
    for name in ["policy/model.safetensors", "policy/adapter_model.safetensors", "critic.safetensors"]:
        if (full / "checkpoint-6" / name).exists():
            a, b = load_file(full / "checkpoint-6" / name), load_file(part / "checkpoint-6" / name)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), name
            compared += 1
    assert compared == (2 if has_critic else 1)
    assert (full / "checkpoint-6/critic.safetensors").exists() == has_critic
    # the resumed run's log reads as one uninterrupted run
    assert [m["step"] for m in _metrics(part)] == [1, 2, 3, 4, 5, 6]
    assert _metrics(part)[-1]["reward/mean"] == _metrics(full)[-1]["reward/mean"]


GROUPS = ["rollout.samples_per_prompt=4", "rollout.batch_size=4"]  # 16 rows a step, minibatches of 2 groups


@pytest.mark.parametrize("overrides", [
    (), ("algo.estimator=grpo", *GROUPS), ("algo.estimator=rloo", *GROUPS), ("algo.estimator=reinforce_pp",),
    ("algo.estimator=dr_grpo", *GROUPS, "kl.in=loss", "kl.estimator=k3"),
    ("algo.estimator=grpo", *GROUPS, "algo.policy_loss=gspo"),
    ("algo.estimator=grpo", *GROUPS, "algo.policy_loss=cispo"),
    # DAPO's pieces together: clip-higher, token mean, dynamic sampling (refill rounds) and overlong shaping
    ("algo.estimator=grpo", *GROUPS, "algo.clip_eps_high=0.28", "loss.agg=token_mean", "algo.dynamic_sampling=true",
     "algo.overlong_buffer=4"),
], ids=["gae", "grpo", "rloo", "reinforce_pp", "dr_grpo-kl_in_loss", "grpo-gspo", "grpo-cispo", "grpo-dapo"])
def test_resume_is_exact(tmp_path, overrides):
    _resume_equal(tmp_path, *overrides)


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo", "reinforce_pp", "dr_grpo"])
def test_each_estimator_runs_and_critic_free_ones_build_no_critic(tmp_path, estimator):
    t = PPOTrainer(_cfg(tmp_path, "max_steps=3", f"algo.estimator={estimator}", *GROUPS))
    critic_params = [p for g in t.optim.optimizer.param_groups[1:] for p in g["params"]]
    if estimator == "gae":
        assert t.actor.value_head is not None and critic_params
    else:  # no value head, no critic parameters in the optimizer, no value metrics
        assert t.actor.critic_module() is None and len(t.optim.optimizer.param_groups) == 1
    t.train()
    rows = _metrics(tmp_path)
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert all(math.isfinite(m["loss/policy"]) for m in rows)
    value_keys = {"loss/value", "val/mean", "val/explained_variance", "val/clipfrac"}
    assert (value_keys <= set(rows[-1])) == (estimator == "gae")
    assert not (value_keys & set(rows[-1])) or estimator == "gae"
    documented = (ROOT / "docs/metrics.md").read_text()
    assert all(f"`{name}`" in documented for name in set(rows[-1]) - {"step"})


@pytest.mark.parametrize("overrides", [("algo.estimator=grpo", *GROUPS), ("algo.estimator=reinforce_pp",)],
                         ids=["grpo", "reinforce_pp"])
def test_critic_free_estimators_learn_the_tiny_task(tmp_path, overrides):
    PPOTrainer(_cfg(tmp_path, *overrides, "checkpoint.every=0")).train()
    rewards = [m["reward/mean"] for m in _metrics(tmp_path)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, (first, last)


def test_kl_in_loss_adds_the_kl_term_and_no_kl_reward(tmp_path):
    t = PPOTrainer(_cfg(tmp_path, "max_steps=2", "kl.in=loss", "kl.estimator=k3", "kl.coef=0.5",
                        "algo.estimator=grpo", *GROUPS))
    last = t.train()
    assert last["loss/kl"] >= 0.0 and math.isfinite(last["loss/kl"])
    assert last["objective/non_score_reward"] == 0.0  # the reward carries no KL
    assert "objective/kl" in last  # still measured, only not paid in the reward
    plain = PPOTrainer(_cfg(tmp_path / "r", "max_steps=1", "algo.estimator=grpo", *GROUPS)).train()
    assert "loss/kl" not in plain


def test_groups_share_a_prompt_and_minibatches_keep_groups_whole(tmp_path, monkeypatch):
    t = PPOTrainer(_cfg(tmp_path, "max_steps=1", "algo.estimator=grpo", *GROUPS))
    rollout, examples, idx = t.rollout(0)
    assert len(rollout.completions) == 16 and len(set(idx)) == 4
    for g in range(4):
        rows = range(4 * g, 4 * g + 4)
        assert len({idx[i] for i in rows}) == 1 and len({rollout.prompts[i] for i in rows}) == 1
        assert torch.equal(rollout.prompt_ids[4 * g], rollout.prompt_ids[4 * g + 3])
        # each sample draws from its own random stream: the k responses of a prompt differ
        assert len({tuple(rollout.response_ids[i].tolist()) for i in rows}) > 1
    seen = []
    original = t.optim.step

    def recording_step(micro, loss_fn, where=""):
        seen.append([m.input_ids for m in micro])
        return original(micro, loss_fn, where=where)

    monkeypatch.setattr(t.optim, "step", recording_step)
    scores, _ = t.score(rollout, examples)
    exp, _ = t.experience(rollout, scores)
    t.update(exp, 0)
    assert len(seen) == 2 * 2  # 2 epochs x 2 minibatches of 8 rows
    for micro in seen:
        ids = torch.cat(micro)
        prompts = {bytes(str(ids[i, : rollout.prompt_ids.shape[1]].tolist()), "utf8") for i in range(len(ids))}
        assert len(prompts) == 2  # two whole groups of four


def test_resume_is_exact_lora_bf16_separate_critic(tmp_path):
    _resume_equal(tmp_path, "lora.enabled=true", "lora.r=4", "precision=bf16", "critic.kind=separate",
                  "ppo.grad_accum_steps=2")


def test_lora_reference_is_base_with_adapters_disabled(tmp_path):
    t = PPOTrainer(_cfg(tmp_path, "lora.enabled=true", "lora.r=4", "max_steps=2"))
    assert t.reference is None  # no second copy of the weights
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    attn = torch.ones_like(ids)
    before = reference_logprobs(t.actor, None, ids, attn, ids[:, -3:], None)
    t.train()
    after = reference_logprobs(t.actor, None, ids, attn, ids[:, -3:], None)
    assert torch.equal(before, after)  # training moved only the adapters
    policy_lp, _, _ = t.actor(ids, attn, ids[:, -3:])
    assert not torch.allclose(policy_lp, after)


def test_kl_off_skips_reference_model(tmp_path):
    t = PPOTrainer(_cfg(tmp_path, "kl.coef=0", "max_steps=1"))
    assert t.reference is None
    out = t.step(0)
    assert out.metrics["objective/kl"] == 0.0


def test_cli_ppo_runs_and_rejects_bad_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "ppolm.cli", "ppo", "--config", "configs/tiny.yaml", *QUIET,
                         "max_steps=2", f"output_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(_metrics(tmp_path)) == 2
    bad = subprocess.run([sys.executable, "-m", "ppolm.cli", "ppo", "configs/tiny.yaml", "ppo.clip_epsilon=0.1"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "clip_eps" in bad.stderr


@pytest.mark.slow
@launches
@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_two_processes_equal_one_process(tmp_path, estimator):
    """Global batch 16: 2 processes x 8 rows vs 1 x 16, one minibatch per epoch (gloo on CPU). With grpo the
    rows are 4 prompts x 4 samples: each process holds whole groups (2 prompts), as one process does.

    Tolerance: summation order differs across processes, so weights agree to 1e-3 after 4 steps, not bitwise.
    """
    script = ROOT / "tests/scripts/ppo_tiny_run.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    common = ["max_steps=4", "ppo.epochs=2", f"algo.estimator={estimator}"]
    k = 4 if estimator == "grpo" else 1
    common += [f"rollout.samples_per_prompt={k}"]
    two = run_launcher(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
         f"output_dir={tmp_path / 'two'}", f"rollout.batch_size={8 // k}", "ppo.minibatch_size=8",
         "ppo.grad_accum_steps=2", *common], cwd=ROOT, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), f"output_dir={tmp_path / 'one'}", f"rollout.batch_size={16 // k}",
                          "ppo.minibatch_size=16", *common], cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(tmp_path / "two/final/model.safetensors")
    b = load_file(tmp_path / "one/final/model.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-3, diff
    ma, mb = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    for x, y in zip(ma, mb):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-6)
        assert x["loss/policy"] == pytest.approx(y["loss/policy"], rel=1e-3, abs=1e-5)


def test_fused_first_forward_gives_the_same_run(tmp_path):
    """One epoch of one minibatch: old log-probs/values from the update's own forward equal a separate one."""
    common = ["max_steps=3", "ppo.epochs=1", "ppo.minibatch_size=16", "checkpoint.every=0"]
    fused = PPOTrainer(_cfg(tmp_path / "fused", *common))
    assert fused.fused_first_forward()
    fused.train()
    plain = PPOTrainer(_cfg(tmp_path / "plain", *common, "ppo.fuse_first_forward=false"))
    assert not plain.fused_first_forward()
    plain.train()
    a = load_file(tmp_path / "fused/final/model.safetensors")
    b = load_file(tmp_path / "plain/final/model.safetensors")
    # The separate forward runs without grad, where SDPA may take another CPU kernel than the grad forward:
    # its old log-probs differ from the update's by rounding (~1e-6), so the runs agree to rounding, not bits.
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    for x, y in zip(_metrics(tmp_path / "fused"), _metrics(tmp_path / "plain")):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-3)
        assert x["loss/policy"] == pytest.approx(y["loss/policy"], abs=1e-4)
        assert x["policy/ratio_mean"] == 1.0  # fused: old and new log-probs are the same numbers
        assert y["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
