"""Pickle-free state I/O: exact round trips of optimizer, scheduler and RNG state; atomic JSON."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ppolm.errors import CheckpointError
from ppolm.state_io import (
    get_rng_state,
    load_json,
    load_optimizer_state,
    load_rng_state,
    load_scheduler_state,
    load_state,
    safe_torch_load,
    save_json,
    save_optimizer_state,
    save_rng_state,
    save_scheduler_state,
    save_state,
    set_rng_state,
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 6, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=3e-2, betas=(0.8, 0.95), weight_decay=0.1, eps=1e-6)


def test_adamw_continues_bit_identically(tmp_path: Path) -> None:
    model_a = _model()
    opt_a = _adamw(model_a)
    _train(model_a, opt_a, steps=3, seed=1)
    save_optimizer_state(opt_a, tmp_path / "optimizer")

    model_b = copy.deepcopy(model_a)
    opt_b = _adamw(model_b)
    load_optimizer_state(opt_b, tmp_path / "optimizer")
    model_c = copy.deepcopy(model_a)  # control: same weights, fresh optimizer state
    opt_c = _adamw(model_c)

    _train(model_a, opt_a, steps=4, seed=2)
    _train(model_b, opt_b, steps=4, seed=2)
    _train(model_c, opt_c, steps=4, seed=2)
    for pa, pb, pc in zip(model_a.parameters(), model_b.parameters(), model_c.parameters()):
        assert torch.equal(pa, pb)
    # the test has teeth: without the restored moments and step the weights differ
    assert not all(torch.equal(pa, pc) for pa, pc in zip(model_a.parameters(), model_c.parameters()))
    assert opt_b.state_dict()["param_groups"][0]["betas"] == (0.8, 0.95)
    assert torch.equal(opt_b.state[next(model_b.parameters())]["step"], torch.tensor(7.0))


def test_optimizer_files_layout(tmp_path: Path) -> None:
    model = _model()
    opt = _adamw(model)
    _train(model, opt, steps=2, seed=0)
    save_optimizer_state(opt, tmp_path / "optimizer")
    tensors = load_file(str(tmp_path / "optimizer.safetensors"))
    assert set(tensors) == {f"state.{i}.{n}" for i in range(4) for n in ("step", "exp_avg", "exp_avg_sq")}
    assert tensors["state.0.step"].shape == () and tensors["state.0.step"].item() == 2.0
    doc = json.loads((tmp_path / "optimizer.json").read_text())
    group = doc["state"]["param_groups"][0]
    assert group["lr"] == 3e-2 and group["betas"] == {"__tuple__": [0.8, 0.95]}
    assert group["params"] == [0, 1, 2, 3]
    assert list(tmp_path.iterdir()) and all(not p.name.startswith(".") for p in tmp_path.iterdir())


def test_optimizer_mismatch_is_checkpoint_error(tmp_path: Path) -> None:
    model = _model()
    opt = _adamw(model)
    _train(model, opt, steps=1, seed=0)
    save_optimizer_state(opt, tmp_path / "optimizer")
    other = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(CheckpointError, match="does not match this optimizer"):
        load_optimizer_state(other, tmp_path / "optimizer")
    with pytest.raises(CheckpointError, match="holds 'optimizer' state, expected 'rng'"):
        load_rng_state(tmp_path / "optimizer")
    (tmp_path / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: file is missing"):
        load_optimizer_state(opt, tmp_path / "optimizer")


class _Warmup:
    """A callable-object lr lambda: LambdaLR saves its __dict__, which here holds one non-JSON value."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.hook = object()

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.warmup)


def test_lambda_lr_round_trip(tmp_path: Path) -> None:
    def build() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
        opt = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.5}])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda e: 0.9**e, _Warmup(warmup=10)])
        return opt, sched

    opt_a, sched_a = build()
    for _ in range(3):
        opt_a.step()
        sched_a.step()
    sched_a.lr_lambdas[1].warmup = 4  # an attribute change the state dict must carry
    save_optimizer_state(opt_a, tmp_path / "optimizer")
    save_scheduler_state(sched_a, tmp_path / "scheduler")

    opt_b, sched_b = build()
    load_optimizer_state(opt_b, tmp_path / "optimizer")
    load_scheduler_state(sched_b, tmp_path / "scheduler")
    assert sched_b.last_epoch == 3 and sched_b.get_last_lr() == sched_a.get_last_lr()
    assert sched_b.lr_lambdas[1].warmup == 4
    for _ in range(3):
        opt_a.step(), sched_a.step(), opt_b.step(), sched_b.step()
        assert sched_b.get_last_lr() == sched_a.get_last_lr()
        assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_a.param_groups]
    saved = json.loads((tmp_path / "scheduler.json").read_text())["state"]
    assert saved["lr_lambdas"][0] is None and "hook" not in saved["lr_lambdas"][1]


def test_generic_state_round_trip_exact(tmp_path: Path) -> None:
    state = {
        "ints": {3: "three", -1: (1, 2.5)},
        "floats": [0.1, 1e-300, math.inf, -math.inf, math.nan],
        "nested": {"t": torch.arange(6, dtype=torch.bfloat16).view(2, 3), "lr": torch.tensor(1e-4)},
        "__tensor__": "a key that looks like a tag",
        "flags": [True, None, "x"],
    }
    save_state(state, tmp_path / "s", kind="misc")
    back = load_state(tmp_path / "s", kind="misc")
    assert back["ints"] == {3: "three", -1: (1, 2.5)}
    assert back["floats"][:4] == [0.1, 1e-300, math.inf, -math.inf] and math.isnan(back["floats"][4])
    assert back["nested"]["t"].dtype == torch.bfloat16 and torch.equal(back["nested"]["t"], state["nested"]["t"])
    assert torch.equal(back["nested"]["lr"], torch.tensor(1e-4))
    assert back["__tensor__"] == "a key that looks like a tag" and back["flags"] == [True, None, "x"]
    with pytest.raises(CheckpointError, match="not a tensor or JSON value"):
        save_state({"f": object()}, tmp_path / "bad", kind="misc")


def test_rng_restore_continues_streams(tmp_path: Path) -> None:
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    random.gauss(0, 1), np.random.randn(), torch.rand(3)  # leave cached Gaussians in the state
    save_rng_state(tmp_path / "rng")
    expected = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn())

    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # "the process restarted"
    load_rng_state(tmp_path / "rng")
    got = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn())
    assert torch.equal(got[0], expected[0])
    assert got[1] == expected[1] and got[2] == expected[2] and got[4] == expected[4]
    assert np.array_equal(got[3], expected[3])


def test_rng_states_per_rank(tmp_path: Path) -> None:
    """Each process resumes its own streams; an old checkpoint (rank 0's state only) serves every rank."""
    states = []
    for seed in (1, 2):  # what rank 0 and rank 1 would hold
        torch.manual_seed(seed)
        states.append(get_rng_state())
    save_rng_state(tmp_path / "rng", states)
    assert (tmp_path / "rng.json").is_file() and (tmp_path / "rng-rank1.json").is_file()
    for rank, seed in ((0, 1), (1, 2)):
        torch.manual_seed(99)
        load_rng_state(tmp_path / "rng", rank)
        torch.manual_seed(seed)
        expected = torch.rand(3)
        torch.manual_seed(99)
        load_rng_state(tmp_path / "rng", rank)
        assert torch.equal(torch.rand(3), expected)
    save_rng_state(tmp_path / "old")
    load_rng_state(tmp_path / "old", rank=3)  # no rank file: rank 0's state
    a = torch.rand(2)
    load_rng_state(tmp_path / "old", rank=0)
    assert torch.equal(torch.rand(2), a)


def test_rng_state_in_memory_and_malformed() -> None:
    state = get_rng_state()
    assert state["torch"].dtype == torch.uint8 and len(state["numpy"]["keys"]) == 624
    a = torch.rand(2)
    set_rng_state(state)
    assert torch.equal(torch.rand(2), a)
    with pytest.raises(CheckpointError, match="RNG state is incomplete"):
        set_rng_state({"python": state["python"]})


def test_save_json_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    save_json(path, {"step": 1, "names": ["a"]})
    save_json(path, {"step": 2})
    assert load_json(path) == {"step": 2} and os.listdir(tmp_path) == ["state.json"]

    def crash(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_json(path, {"step": 3})
    monkeypatch.undo()
    assert load_json(path) == {"step": 2} and os.listdir(tmp_path) == ["state.json"]
    with pytest.raises(ValueError):
        save_json(path, {"x": math.nan})  # strict JSON: readers in other languages reject NaN


def test_load_json_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing\.json: file is missing"):
        load_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(CheckpointError, match=r"bad\.json: not valid JSON"):
        load_json(tmp_path / "bad.json")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_safe_torch_load(tmp_path: Path) -> None:
    weights = {"w": torch.arange(4.0), "b": torch.ones(2, dtype=torch.float16)}
    torch.save(weights, tmp_path / "pytorch_model.bin")
    back = safe_torch_load(tmp_path / "pytorch_model.bin")
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)
    with pytest.raises(CheckpointError, match="only reads legacy .bin"):
        safe_torch_load(tmp_path / "model.pt")

    marker = tmp_path / "pwned"
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(_Payload(marker)))  # legacy raw pickle
    torch.save({"x": _Payload(marker)}, tmp_path / "evil_zip.bin")  # torch's zip format
    for name in ("evil.bin", "evil_zip.bin"):
        with pytest.raises(CheckpointError, match=f"{name}: refused to load"):
            safe_torch_load(tmp_path / name)
    assert not marker.exists()
    # control: the payload is live, so the assertion above means something
    live = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(live))).close()
    assert live.exists()


def _touched_pages(mb: int):
    """`mb` MB of fresh anonymous pages, each written once, so they are resident. An anonymous mmap, not a numpy
    array: malloc may hand an array memory that an earlier test freed but left resident (then RSS does not grow,
    which made this test fail once in CI); the kernel's mmap always gives new pages."""
    import mmap

    import numpy as np

    region = mmap.mmap(-1, mb * 2**20)
    np.frombuffer(region, dtype=np.uint8)[:: mmap.PAGESIZE] = 1  # the view is a temporary: close() can unmap
    return region


def test_peak_rss_restarts_from_the_reset():
    """reset_peak_rss makes peak_rss_mb measure from the reset: 400 MB resident and unmapped before it no longer
    count, 100 MB touched after it do."""
    from ppolm.runtime import peak_rss_mb, reset_peak_rss

    big = _touched_pages(400)
    before = peak_rss_mb()
    big.close()
    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs on this system")
    after = peak_rss_mb()
    assert before - after > 300, (before, after)
    small = _touched_pages(100)
    assert peak_rss_mb() - after > 80, (after, peak_rss_mb())
    small.close()


def test_atomic_directory_swaps_in_one_step_so_a_crash_never_leaves_no_directory(tmp_path, monkeypatch):
    """A guard's rollback replaces final/ through atomic_directory: a crash right before or right after the
    swap leaves a whole final/ (the old one or the new one), never none."""
    import ppolm.state_io as sio

    dest = tmp_path / "final"
    with sio.atomic_directory(dest) as tmp:
        (tmp / "weights").write_text("old")

    class Crash(BaseException):
        pass

    def crash(*a, **k):
        raise Crash

    with monkeypatch.context() as m:  # the process dies just before the swap
        m.setattr(sio, "exchange_paths", crash)
        with pytest.raises(Crash):
            with sio.atomic_directory(dest) as tmp:
                (tmp / "weights").write_text("new")
    assert (dest / "weights").read_text() == "old"
    real_exchange = sio.exchange_paths

    def exchange_then_crash(a, b):  # the process dies right after the swap, before anything is cleaned up
        assert real_exchange(a, b)
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(sio, "exchange_paths", exchange_then_crash)
        with pytest.raises(Crash):
            with sio.atomic_directory(dest) as tmp:
                (tmp / "weights").write_text("new")
    assert (dest / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # the old tree went with the temp dir
