"""Out-of-memory recovery (ppolm.trainers.oom): injected allocator errors in the rollout, the fused first forward and
the update (padded and packed) halve that micro-batch for the rest of the run, are logged in metrics.jsonl, and give
the run that used the smaller micro-batch from the start. No test machine runs out of memory for real."""

import json
from pathlib import Path

import pytest
import torch

from ppolm.config import PPORunConfig, load_config
from ppolm.trainers.micro_batches import MicroBatchSizes
from ppolm.trainers.oom import OOMRecovery, is_out_of_memory
from ppolm.trainers.ppo import PPOTrainer

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.progress=false", "log.tensorboard=false"]
CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789 bytes. Error code 12"


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError(CPU_OOM))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator's error type


def test_halving_sequence():
    s = MicroBatchSizes(rollout_prompts=5, rows=6, max_tokens=None, largest=6)
    assert s.halve("rollout") == "rollout prompts per generate call 5 -> 3"
    assert s.halve("rollout") and s.halve("rollout") and s.rollout_prompts == 1
    assert s.halve("rollout") is None  # one prompt: nothing left to halve
    assert s.halve("update") == "rows per micro-batch 6 -> 3" and s.rows == 3
    s.largest = 1
    assert s.halve("score") is None  # one row per micro-batch
    t = MicroBatchSizes(rollout_prompts=4, rows=8, max_tokens=1000, largest=5)
    assert t.halve("update") == "tokens per micro-batch 1000 -> 500" and t.rows == 8


def test_run_retries_restores_rng_and_resets():
    sizes = MicroBatchSizes(rollout_prompts=8, rows=8, max_tokens=None, largest=8)
    resets, draws = [], []

    def phase():
        draws.append(torch.rand(1).item())  # a try that draws from the global RNG before failing
        if sizes.rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return sizes.rows

    rec = OOMRecovery(sizes, enabled=True, reset=lambda: resets.append(1), log=lambda msg: None)
    torch.manual_seed(0)
    expected = torch.rand(1).item()
    torch.manual_seed(0)
    assert rec.run("update", phase) == 2
    assert draws == [expected] * 3  # each retry saw the RNG as the first try did
    assert rec.retries == 2 and len(resets) == 2
    assert rec.events == ["update: rows per micro-batch 8 -> 4", "update: rows per micro-batch 4 -> 2"]
    assert rec.step_metrics(0) == {"oom/retries": 2.0, "oom/rollout_prompts": 8.0, "oom/micro_rows": 2.0}
    assert rec.step_metrics(2) == {"oom/retries": 0.0}


def test_run_raises_what_it_cannot_recover():
    sizes = MicroBatchSizes(rollout_prompts=1, rows=8, max_tokens=None, largest=8)

    def boom(exc):
        def fn():
            raise exc
        return fn

    with pytest.raises(RuntimeError, match="shape"):  # not an out-of-memory error
        OOMRecovery(sizes, enabled=True).run("update", boom(RuntimeError("shape mismatch")))
    with pytest.raises(torch.OutOfMemoryError):  # recovery off (several processes, DeepSpeed, the config)
        OOMRecovery(sizes, enabled=False).run("update", boom(torch.OutOfMemoryError("out of memory")))
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):  # already one prompt per call
        OOMRecovery(sizes, enabled=True, log=lambda m: None).run("rollout", boom(RuntimeError(CPU_OOM)))


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path, name, overrides, inject=None):
    """A 3-step tiny PPO run (checkpoint at step 2); inject(trainer) patches it to raise; -> (metrics, trainer)."""
    cfg = load_config(PPORunConfig, ROOT / "configs/tiny.yaml",
                      [*QUIET, f"output_dir={tmp_path / name}", "max_steps=3", "checkpoint.every=2", *overrides])
    t = PPOTrainer(cfg, reward_fn=lambda prompts, completions, **rows: [len(set(c)) / 10 for c in completions])
    if inject is not None:
        inject(t)
    t.train()
    return _metrics(tmp_path / name), t


def _fail_once(t, method, when, error=CPU_OOM):
    """Patch t.<method> (a dotted path) to raise an allocator error the first time when(*args, **kwargs) holds."""
    *path, name = method.split(".")
    for attr in path:
        t = getattr(t, attr)
    original, fired = getattr(t, name), []

    def patched(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            fired.append(1)
            raise RuntimeError(error) if isinstance(error, str) else error
        return original(*args, **kwargs)

    setattr(t, name, patched)
    return fired


def _same_run(a, b, exact=False):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("reward/mean", "objective/kl", "loss/policy", "policy/entropy", "optim/grad_norm",
                    "response/length_mean", *(k for k in ("loss/value", "loss/kl") if k in x)):
            if exact:
                assert x[key] == y[key], key
            else:  # accumulation over a different split: float rounding only
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=5e-5), key


CASES = {
    # tiny.yaml: 16 rows a step, minibatches of 8 (2 epochs): an update micro-batch of 8 rows fails once
    "update": ([], ["ppo.grad_accum_steps=2"], "minibatch_loss", lambda m, **kw: len(m) > 4,
               {"oom/micro_rows": 4.0}),
    # the scoring pass (no grad: old log-probs and values) fails on 8 rows
    "score": ([], ["ppo.grad_accum_steps=2"], "actor.forward",
              lambda ids, *a, **kw: not torch.is_grad_enabled() and ids.shape[0] > 4, {"oom/micro_rows": 4.0}),
    # one generate call of all 16 prompts fails; the smaller run makes two calls of 8 from the start
    "rollout": ([], ["rollout.micro_batch_size=8"], "_generate", lambda ids, *a: ids.shape[0] > 8,
                {"oom/rollout_prompts": 8.0}),
    # packed: a micro-batch of more than 250 tokens fails (the toy rows are ~40-60 tokens)
    "packed": (["ppo.max_tokens=400"], ["ppo.max_tokens=200"], "minibatch_loss",
               lambda m, **kw: float(m.attention_mask.sum()) > 250, {"oom/max_tokens": 200.0}),
    # one epoch of one minibatch: the fused first forward's backward fails; the retry splits in two without it
    "fused": (["rollout.batch_size=8", "ppo.epochs=1"], ["rollout.batch_size=8", "ppo.epochs=1",
                                                          "ppo.grad_accum_steps=2"],
              "minibatch_loss", lambda m, fused=None, **kw: fused is not None, {"oom/micro_rows": 4.0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_injected_oom_equals_the_smaller_micro_batch_from_the_start(tmp_path, case):
    common, smaller, method, when, sizes = CASES[case]
    recovered_fired = []
    recovered, t = _run(tmp_path, "recovered", common,
                        inject=lambda t: recovered_fired.extend([_fail_once(t, method, when)]))
    if case == "fused":
        assert t.cfg.ppo.fuse_first_forward and not t.fused_first_forward()  # off once the split is smaller
    assert recovered_fired[0] == [1]  # the error was injected
    from_start, _ = _run(tmp_path, "from-start", smaller)
    assert recovered[0]["oom/retries"] == 1.0 and all(m["oom/retries"] == 0.0 for m in recovered[1:])
    assert {k: recovered[0][k] for k in sizes} == sizes  # logged in metrics.jsonl
    assert all("oom/rollout_prompts" not in m for m in recovered[1:] + from_start)
    # the rollout retry runs the same code as the smaller run: equal bit for bit; the others within rounding
    _same_run(from_start, recovered, exact=case == "rollout")
    state = json.loads((tmp_path / "recovered" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["micro_batches"] == t.micro.state_dict()  # a resumed run keeps the halved size


def test_injected_oom_is_raised_when_recovery_is_off(tmp_path):
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
        _run(tmp_path, "off", ["ppo.oom_recovery=false"],
             inject=lambda t: _fail_once(t, "minibatch_loss", lambda m, **kw: True))


def test_the_forward_an_oom_retry_drops_is_freed_in_bf16(tmp_path):
    """The fused first forward's graph, dropped without a backward when its micro-batch fails, is freed (bf16
    autocast: the forward runs under the saved-tensor hooks of ppolm.memory.recast_saved_weights, whose pack hook
    once made a reference cycle of every op that saves its own output, so each dropped forward stayed in memory:
    its saved activations are tensors with a grad_fn that nothing reachable holds)."""
    import gc

    common = ["rollout.batch_size=8", "ppo.epochs=1", "precision=bf16", "max_steps=1", "checkpoint.every=0"]
    cfg = load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [*QUIET, f"output_dir={tmp_path / 'run'}", *common])
    t = PPOTrainer(cfg, reward_fn=lambda prompts, completions, **rows: [len(set(c)) / 10 for c in completions])
    fired = _fail_once(t, "minibatch_loss", lambda m, fused=None, **kw: fused is not None)
    t.train()
    gc.collect()
    assert fired == [1]
    in_graphs = [o for o in gc.get_objects() if type(o) is torch.Tensor and o.grad_fn is not None]
    assert not in_graphs, [tuple(o.shape) for o in in_graphs[:5]]
