"""Invalid PPO configs are rejected before any model loads: exit code 2, one line naming the key and what is
allowed, no traceback, also under `python -O` (validation must not rely on assert).

"Before any model loads" is proved twice: in-process, `ppolm.models.load.resolve` (the first thing every model
or tokenizer load calls) is replaced by a function that fails the test; in subprocesses every case also sets
`model=/nonexistent/dir`, whose own error would win if the config error came later.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
import kill_harness as kh

import ppolm.models.load
from ppolm.cli import main

ROOT = Path(__file__).resolve().parents[1]
NO_MODEL = "model=/nonexistent/dir"


@dataclass(frozen=True)
class Case:
    """An invalid config: overrides on configs/tiny.yaml (or a YAML file of its own) and what the message says."""

    id: str
    overrides: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()
    yaml: bytes | None = None  # the config file's bytes instead of configs/tiny.yaml
    missing_file: bool = False
    heavy: bool = False  # caught by PPOTrainer (task / reward lookup), after the trainer's imports


CASES = [
    # unknown keys, with did-you-mean and the keys allowed there
    Case("unknown-top", ("modle=x",), ("unknown key 'modle'", "did you mean 'model'", "allowed here: model,")),
    Case("unknown-nested", ("ppo.clip_epsilon=0.1",), ("'ppo.clip_epsilon'", "did you mean 'clip_eps'", "vf_coef")),
    Case("unknown-rollout", ("rollout.temprature=0.5",), ("'rollout.temprature'", "did you mean 'temperature'")),
    Case("unknown-kl", ("kl.estimater=k1",), ("'kl.estimater'", "did you mean 'estimator'")),
    Case("unknown-no-hint", ("optim.learning_rate=0.1",), ("'optim.learning_rate'", "allowed here: lr, critic_lr")),
    # wrong types
    Case("type-int", ("rollout.batch_size=abc",), ("'rollout.batch_size'", "valid integer", "'abc'")),
    Case("type-bool", ("ppo.whiten_advantages=maybe",), ("'ppo.whiten_advantages'", "valid boolean")),
    Case("type-section", ("ppo=5",), ("key 'ppo'", "valid dictionary")),
    Case("type-list", ("rollout.stop=abc",), ("'rollout.stop'", "valid list")),
    Case("type-fraction", ("seed=1.5",), ("'seed'", "valid integer")),
    Case("type-betas", ("optim.betas=[0.9]",), ("'optim.betas",)),
    # out of range
    Case("clip-eps-0", ("ppo.clip_eps=0",), ("'ppo.clip_eps'", "greater than 0", "(got 0)")),
    Case("clip-eps-1.5", ("ppo.clip_eps=1.5",), ("'ppo.clip_eps'", "less than 1", "(got 1.5)")),
    Case("temperature", ("rollout.temperature=-1",), ("'rollout.temperature'", "greater than or equal to 0")),
    Case("top-p-0", ("rollout.top_p=0",), ("'rollout.top_p'", "greater than 0")),
    Case("top-k", ("rollout.top_k=-1",), ("'rollout.top_k'", "greater than or equal to 0")),
    Case("lr-0", ("optim.lr=0",), ("'optim.lr'", "greater than 0")),
    Case("lr-2", ("optim.lr=2",), ("'optim.lr'", "less than or equal to 1")),
    Case("max-steps-0", ("max_steps=0",), ("'max_steps'", "greater than or equal to 1")),
    Case("max-new-tokens-0", ("rollout.max_new_tokens=0",), ("'rollout.max_new_tokens'", "greater than or equal to 1")),
    Case("kl-coef", ("kl.coef=-0.1",), ("'kl.coef'", "greater than or equal to 0")),
    Case("kl-target", ("kl.target=0",), ("'kl.target'", "greater than 0")),
    Case("checkpoint-every", ("checkpoint.every=-1",), ("'checkpoint.every'", "greater than or equal to 0")),
    Case("lora-dropout", ("lora.dropout=1.0",), ("'lora.dropout'", "less than 1")),
    Case("eval-fraction", ("task.eval_fraction=1",), ("'task.eval_fraction'", "less than 1")),
    Case("log-every", ("log.every=0",), ("'log.every'", "greater than or equal to 1")),
    # bad enums: the allowed values are listed
    Case("precision", ("precision=fp16",), ("'precision'", "'auto', 'fp32' or 'bf16'", "'fp16'")),
    Case("kl-estimator", ("kl.estimator=k7",), ("'kl.estimator'", "'k1', 'k2' or 'k3'")),
    Case("critic-kind", ("critic.kind=mlp",), ("'critic.kind'", "'head' or 'separate'")),
    Case("critic-init", ("critic.init=value",), ("'critic.init'", "'policy' or 'reward'")),
    Case("schedule", ("optim.schedule=exp",), ("'optim.schedule'", "'constant', 'linear' or 'cosine'")),
    # relations between keys
    Case("minibatch", ("rollout.batch_size=16", "ppo.minibatch_size=5"),
         ("ppo.minibatch_size (5) must divide rollout.batch_size (16)",)),
    Case("grad-accum", ("ppo.minibatch_size=8", "ppo.grad_accum_steps=3"),
         ("ppo.grad_accum_steps (3) must divide ppo.minibatch_size (8)",)),
    Case("critic-init-reward", ("critic.kind=separate", "critic.init=reward"), ("critic.init", "reward.model")),
    Case("estimator", ("algo.estimator=ppo",), ("'algo.estimator'", "'gae', 'grpo', 'rloo', 'reinforce_pp' or 'dr_grpo'")),
    Case("kl-in", ("kl.in=advantage",), ("'kl.in'", "'reward' or 'loss'")),
    Case("groups-split", ("rollout.samples_per_prompt=3",),
         ("ppo.minibatch_size (8) must be a multiple of rollout.samples_per_prompt (3)",)),
    Case("groups-divide", ("rollout.batch_size=3", "rollout.samples_per_prompt=4", "ppo.minibatch_size=8"),
         ("ppo.minibatch_size (8) must divide rollout.batch_size x rollout.samples_per_prompt (12)",)),
    Case("critic-free-separate", ("algo.estimator=grpo", "critic.kind=separate"),
         ("critic.kind: 'separate' needs a critic", "'grpo'")),
    Case("reward-fn-no-name", ("reward.functions=[{weight: 2}]",), ("'reward.functions.0.name'", "Field required")),
    # settings that would run and do nothing (issue 24): no baseline without a group, a k1 KL term without gradient
    Case("group-k1", ("algo.estimator=grpo",), ("algo.estimator 'grpo' needs rollout.samples_per_prompt >= 2",
                                                "REINFORCE on the raw reward")),
    Case("kl-loss-k1", ("kl.in=loss",), ("kl.in: 'loss' with kl.estimator: 'k1'", "set kl.estimator: k3")),
    Case("loss-agg", ("loss.agg=seq_mean",),
         ("'loss.agg'", "'token_mean', 'seq_mean_token_mean' or 'seq_mean_token_sum_norm'", "'seq_mean'")),
    # overrides
    Case("override-no-equals", ("ppo.clip_eps",), ("override 'ppo.clip_eps'", "expected key=value")),
    Case("override-empty-key", ("=3",), ("override '=3'", "empty key")),
    Case("override-not-section", ("seed.x=1",), ("'seed' is not a section",)),
    # the file itself
    Case("yaml-syntax", yaml=b"model: tiny-random-llama\nppo:\n  epochs: 2\n   minibatch_size: 8\n",
         expect=(".yaml:4: invalid YAML",)),
    Case("yaml-unclosed", yaml=b"rollout: {batch_size: 16\n", expect=(".yaml:2: invalid YAML",)),
    Case("yaml-list", yaml=b"- a\n- b\n", expect=("top level must be a mapping", "got list")),
    Case("yaml-duplicate-key", yaml=b"eval:\n  every: 2\nseed: 1\neval:\n  limit: 8\n",
         expect=(".yaml:4: invalid YAML", "key 'eval' is given twice")),
    Case("guard-without-eval", overrides=("guard.max_drop=0.1",), expect=("set eval.every > 0",)),
    Case("yaml-scalar", yaml=b"hello\n", expect=("top level must be a mapping", "got str")),
    Case("yaml-not-utf8", yaml=b"seed: \xff\n", expect=("not UTF-8",)),
    Case("yaml-missing", missing_file=True, expect=("cannot read config", "No such file")),
    # checked by the trainer from registries, still before any model
    Case("task-name", ("task.name=nope",), ("task.name 'nope'", "allowed: toy, classification"), heavy=True),
    Case("task-import", ("task.name=no_such_mod:Task",), ("task.name 'no_such_mod:Task'", "cannot import"), heavy=True),
    Case("task-option", ("task.options.n_promts=3",), ("task.options.n_promts", "chars, n_prompts, prompt_words"),
         heavy=True),
    Case("task-option-type", ("task.options.n_prompts=abc",), ("task.options.n_prompts", "valid integer"),
         heavy=True),
    Case("reward-name", ("reward.functions=[{name: nope}]",), ("reward function 'nope'", "allowed: classification"),
         heavy=True),
    Case("reward-import", ("reward.functions=[{name: 'no_such_mod:fn'}]",), ("'no_such_mod:fn'", "cannot import"),
         heavy=True),
    Case("reward-kwargs", ("reward.functions=[{name: contains, kwargs: {bogus: 1}}]",),
         ("'contains'", "['bogus']", "allowed: words"), heavy=True),
]


def _argv(case: Case, tmp: Path) -> list[str]:
    """`ppolm ppo` arguments of a case; the missing model comes first so that a case may not undo it."""
    if case.missing_file:
        config = tmp / "does-not-exist.yaml"
    elif case.yaml is not None:
        config = tmp / f"{case.id}.yaml"
        config.write_bytes(case.yaml)
    else:
        config = ROOT / "configs/tiny.yaml"
    return ["ppo", "--config", str(config), NO_MODEL, f"output_dir={tmp / 'out'}", "log.progress=false",
            "log.tensorboard=false", *case.overrides]


def _problems(rc: int, stdout: str, stderr: str, case: Case) -> list[str]:
    """What is wrong with how one case was rejected (empty when it was rejected properly)."""
    lines = stderr.strip().splitlines()
    problems = []
    if rc != 2:
        problems.append(f"exit code {rc}")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"stderr is not one 'error: ' line: {stderr[-800:]!r}")
    if "Traceback" in stderr:
        problems.append("traceback shown")
    if "/nonexistent/dir" in stderr:
        problems.append("the model was looked up before the config error was found")
    problems += [f"missing {e!r}" for e in case.expect if e not in stderr]
    if stdout.strip():
        problems.append(f"stdout not empty: {stdout[-300:]!r}")
    return problems


def test_at_least_25_distinct_cases() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rejected_in_process_before_any_model_loads(case: Case, tmp_path, monkeypatch, capfd) -> None:
    looked_up: list[str] = []

    def no_model(name: str):
        looked_up.append(name)
        raise AssertionError(f"model {name!r} resolved before the config error was reported")

    monkeypatch.setattr(ppolm.models.load, "resolve", no_model)
    rc = main(_argv(case, tmp_path))
    out, err = capfd.readouterr()
    assert _problems(rc, out, err, case) == []
    assert looked_up == []
    assert not (tmp_path / "out").exists()  # nothing written either


def test_every_case_rejected_by_cli_processes_under_python_O(tmp_path) -> None:
    """Each case in a fresh process running ppolm.cli.main, forked from a `python -O` server (one torch
    import for all of them, instead of up to 30 s per process on a loaded machine)."""
    server = kh.shared_server(optimize=True)
    assert server.optimize == 1
    failures = []
    for case in CASES:
        job = server.run("cli", _argv(case, tmp_path), tmp_path / "logs", timeout=120)
        failures += [f"{case.id}: {p}" for p in _problems(job.rc, job.out(), job.err(), case)]
    assert failures == []


SAMPLE = ("unknown-nested", "type-int", "clip-eps-1.5", "precision", "minibatch", "override-no-equals", "yaml-syntax",
          "yaml-missing")


def test_python_O_m_ppolm_cli_entry_point(tmp_path) -> None:
    """One case of each kind through the real `python -O -m ppolm.cli ppo ...` (they never import torch)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        (case, subprocess.Popen([sys.executable, "-O", "-m", "ppolm.cli", *_argv(case, tmp_path)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for case in CASES if case.id in SAMPLE
    ]
    assert len(procs) == len(SAMPLE)
    failures = []
    for case, proc in procs:
        out, err = proc.communicate(timeout=120)
        failures += [f"{case.id}: {p}" for p in _problems(proc.returncode, out, err, case)]
    assert failures == []


# ---- found while writing the cases above (see the issue-5 report); strict: they flag the fix ------------------
def test_critic_init_reward_without_reward_model_is_rejected_for_head_critic(tmp_path, monkeypatch, capfd) -> None:
    case = Case("critic-init-head", ("critic.init=reward",), ("critic.init", "reward.model"))
    monkeypatch.setattr(ppolm.models.load, "resolve", lambda name: pytest.fail(f"model {name!r} resolved"))
    rc = main(_argv(case, tmp_path))
    out, err = capfd.readouterr()
    assert _problems(rc, out, err, case) == []


def test_unknown_key_in_reward_function_entry_has_hint(tmp_path, capfd) -> None:
    case = Case("reward-fn-key", ("reward.functions=[{name: contains, wieght: 2}]",),
                ("'reward.functions.0.wieght'", "did you mean 'weight'", "allowed here: name, weight, kwargs"))
    rc = main(_argv(case, tmp_path))
    out, err = capfd.readouterr()
    assert _problems(rc, out, err, case) == []


def test_unknown_task_option_has_did_you_mean(tmp_path, capfd) -> None:
    case = Case("task-option-hint", ("task.options.n_promts=3",), ("did you mean 'n_prompts'",))
    rc = main(_argv(case, tmp_path))
    out, err = capfd.readouterr()
    assert _problems(rc, out, err, case) == []
