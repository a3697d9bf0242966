"""Crash-safe checkpoints: manifest verification, fallback, stale temps, retention, crashes, pickles."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from ppolm.checkpoint import MANIFEST, CheckpointManager
from ppolm.errors import CheckpointError
from ppolm.state_io import (
    load_optimizer_state,
    load_rng_state,
    safe_torch_load,
    save_json,
    save_optimizer_state,
    save_rng_state,
)


@pytest.fixture(scope="module")
def tiny_llama() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A tiny Llama plus an AdamW that has taken one step (so its state holds real tensors)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = transformers.LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return model, opt


def _real_writer(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        save_optimizer_state(opt, tmp / "optimizer")
        save_rng_state(tmp / "rng")
        save_json(tmp / "trainer_state.json", {"step": step, "kl_coef": 0.05})

    return write


def _small_writer(tag: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        (tmp / "weights.safetensors").write_bytes(f"weights {tag}".encode() * 10)
        save_json(tmp / "trainer_state.json", {"tag": tag})

    return write


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _dir_names(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir()}


def test_save_layout_and_manifest(tmp_path: Path, tiny_llama: tuple) -> None:
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(3, _real_writer(*tiny_llama, step=3))
    assert path == tmp_path / "checkpoint-3" and _dir_names(tmp_path) == {"checkpoint-3", "LATEST"}
    assert (tmp_path / "LATEST").read_text() == "checkpoint-3\n"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 3
    listed = {e["path"]: e for e in manifest["files"]}
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(listed) == on_disk
    assert {"model/model.safetensors", "model/config.json", "optimizer.safetensors", "rng.json"} <= on_disk
    weights = listed["model/model.safetensors"]
    assert weights["size"] == (path / "model/model.safetensors").stat().st_size and len(weights["sha256"]) == 64
    mgr.verify(path)
    assert mgr.list_complete() == [(3, path)]
    assert mgr.latest_valid(log=pytest.fail) == path  # nothing to report on a healthy run


def test_every_truncation_and_flipped_byte_is_detected(tmp_path: Path, tiny_llama: tuple) -> None:
    mgr = CheckpointManager(tmp_path / "run")
    path = mgr.save(1, _real_writer(*tiny_llama, step=1))
    files = sorted(p for p in path.rglob("*") if p.is_file())
    assert len(files) >= 8
    for f in files:
        rel = f.relative_to(path).as_posix()
        original = f.read_bytes()
        size = len(original)
        for cut in (0, size // 2, size - 1):
            f.write_bytes(original[:cut])
            with pytest.raises(CheckpointError, match=f"checkpoint-1 is damaged \\({rel}: "):
                mgr.verify(path)
        for offset in sorted({0, 1, size // 3, size // 2, size - 2, size - 1}):
            f.write_bytes(original)
            _flip(f, offset)
            with pytest.raises(CheckpointError, match=f"\\({rel}: (checksum mismatch|not a valid manifest)\\)"):
                mgr.verify(path)
        f.write_bytes(original)
        mgr.verify(path)  # restored: valid again, so each failure above was caused by that one change


def test_verify_messages(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(2, _small_writer("a"))
    (path / "notes.txt").write_text("extra files are ignored")
    mgr.verify(path)
    (path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"\(weights\.safetensors: size mismatch, 1 bytes instead of 90\)"):
        mgr.verify(path)
    (path / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-2 is damaged \(weights\.safetensors: missing\)"):
        mgr.verify(path)
    raw = (path / MANIFEST).read_text()
    # edits that keep the manifest valid JSON are caught by its self-checksum, not just by parsing
    edits = [('"step": 2', '"step": 2.0'), (" ", "\t"), ('"created": 1', '"created": 2')]
    for edited in (raw.replace(old, new, 1) for old, new in edits):
        assert edited != raw
        json.loads(edited)
        (path / MANIFEST).write_text(edited)
        with pytest.raises(CheckpointError, match=r"\(manifest\.json: checksum mismatch\)"):
            mgr.verify(path)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"\(manifest\.json: missing\)"):
        mgr.verify(path)
    other = mgr.save(4, _small_writer("b"))
    shutil.copytree(other, tmp_path / "checkpoint-9")  # a copy under the wrong name
    with pytest.raises(CheckpointError, match="records step 4, not the step in the directory name"):
        mgr.verify(tmp_path / "checkpoint-9")


def test_fallback_to_previous_when_newest_damaged(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    for step in (4, 8, 12):
        mgr.save(step, _small_writer(str(step)))
    _flip(tmp_path / "checkpoint-12" / "weights.safetensors", 5)
    lines: list[str] = []
    assert mgr.latest_valid(log=lines.append) == tmp_path / "checkpoint-8"
    assert lines == ["checkpoint-12 is damaged (weights.safetensors: checksum mismatch); falling back to checkpoint-8"]

    (tmp_path / "checkpoint-8" / "trainer_state.json").unlink()
    lines.clear()
    assert mgr.latest_valid(log=lines.append) == tmp_path / "checkpoint-4"
    assert len(lines) == 1 and "checkpoint-8 is damaged (trainer_state.json: missing)" in lines[0]
    assert lines[0].endswith("; falling back to checkpoint-4")

    (tmp_path / "checkpoint-4" / MANIFEST).unlink()
    lines.clear()
    assert mgr.latest_valid(log=lines.append) is None
    assert len(lines) == 1 and "checkpoint-4 is damaged (manifest.json: missing)" in lines[0]


def test_latest_missing_or_corrupt_scans_directories(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    assert mgr.latest_valid(log=pytest.fail) is None  # fresh run: no checkpoints, nothing to say
    for step in (2, 10, 6):
        mgr.save(step, _small_writer(str(step)))
    (tmp_path / "LATEST").write_bytes(b"\xff\x00garbage")
    lines: list[str] = []
    assert mgr.latest_valid(log=lines.append) == tmp_path / "checkpoint-10"
    assert lines == ["LATEST is unreadable; falling back to checkpoint-10"]
    (tmp_path / "LATEST").write_text("checkpoint-99\n")
    lines.clear()
    assert mgr.latest_valid(log=lines.append) == tmp_path / "checkpoint-10"
    assert lines == ["LATEST names checkpoint-99, which does not exist; falling back to checkpoint-10"]
    (tmp_path / "LATEST").unlink()
    lines.clear()
    assert mgr.latest_valid(log=lines.append) == tmp_path / "checkpoint-10"
    assert len(lines) == 1 and lines[0].startswith("LATEST is missing")


def test_latest_is_trusted_over_higher_steps(tmp_path: Path) -> None:
    """LATEST is the commit record: a run resumed from step 4 that saved step 6 resumes from 6, not 10."""
    mgr = CheckpointManager(tmp_path)
    for step in (4, 10, 6):
        mgr.save(step, _small_writer(str(step)))
    assert mgr.latest_valid(log=pytest.fail) == tmp_path / "checkpoint-6"
    assert [s for s, _ in mgr.list_complete()] == [10, 6, 4]


def test_stale_temp_dirs_removed(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, _small_writer("5"))
    for name in (".tmp-checkpoint-6-4242", ".tmp-checkpoint-3-77-deleting"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.safetensors").write_bytes(b"half written")
    (tmp_path / ".tmp-checkpoint-best-6-4242").mkdir()  # another manager's save: not ours to remove
    lines: list[str] = []
    assert mgr.latest_valid(log=lines.append) == tmp_path / "checkpoint-5"
    assert len(lines) == 1 and "removed 2 stale temporary checkpoint" in lines[0]
    assert ".tmp-checkpoint-6-4242" in lines[0]
    assert _dir_names(tmp_path) == {"checkpoint-5", "LATEST", ".tmp-checkpoint-best-6-4242"}


def test_retention_keeps_newest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in range(1, 6):
        mgr.save(step, _small_writer(str(step)))
    assert [s for s, _ in mgr.list_complete()] == [5, 4]
    assert _dir_names(tmp_path) == {"checkpoint-5", "checkpoint-4", "LATEST"}
    with pytest.raises(RuntimeError):
        mgr.save(6, lambda tmp: (_ for _ in ()).throw(RuntimeError("boom")))
    assert [s for s, _ in mgr.list_complete()] == [5, 4]  # a failed save deletes nothing


def test_crash_inside_write_fn_leaves_no_trace(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _small_writer("1"))
    before = (tmp_path / "LATEST").read_bytes()

    def crashing(tmp: Path) -> None:
        _small_writer("2")(tmp)
        raise KeyboardInterrupt  # e.g. the job was killed mid-write

    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, crashing)
    assert _dir_names(tmp_path) == {"checkpoint-1", "LATEST"}
    assert (tmp_path / "LATEST").read_bytes() == before
    assert mgr.latest_valid(log=pytest.fail) == tmp_path / "checkpoint-1"


def test_saving_same_step_replaces(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(7, _small_writer("old"))
    path = mgr.save(7, _small_writer("new"))
    assert json.loads((path / "trainer_state.json").read_text()) == {"tag": "new"}
    assert _dir_names(tmp_path) == {"checkpoint-7", "LATEST"}
    mgr.verify(path)


def test_write_fn_may_not_write_manifest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="must not write manifest.json"):
        mgr.save(1, lambda tmp: (tmp / MANIFEST).write_text("{}"))
    assert mgr.list_complete() == [] and not (tmp_path / "LATEST").exists()


class _Payload:
    """Unpickling this runs open(marker, 'w'): proof that code executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickles_never_execute(tmp_path: Path, tiny_llama: tuple) -> None:
    model, opt = tiny_llama
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Payload(marker))

    def write(tmp: Path) -> None:
        save_optimizer_state(opt, tmp / "optimizer")
        save_rng_state(tmp / "rng")
        for name in ("optimizer.safetensors", "rng.json", "pytorch_model.bin"):
            (tmp / name).write_bytes(evil)

    # whoever planted the files also wrote a matching manifest: verification passes, loading must not
    path = CheckpointManager(tmp_path / "run").save(1, write)
    CheckpointManager(tmp_path / "run").verify(path)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: not a valid safetensors file"):
        load_optimizer_state(fresh, path / "optimizer")
    with pytest.raises(CheckpointError, match=r"rng\.json: not valid JSON"):
        load_rng_state(path / "rng")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused to load"):
        safe_torch_load(path / "pytorch_model.bin")
    assert not marker.exists()

    # a pickle swapped into an honest checkpoint is caught before loading even starts
    honest = CheckpointManager(tmp_path / "honest").save(1, _real_writer(model, opt, step=1))
    (honest / "optimizer.safetensors").write_bytes(evil)
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: size mismatch"):
        CheckpointManager(tmp_path / "honest").verify(honest)
    assert not marker.exists()
    pickle.loads(evil).close()  # control: the payload is live, so the checks above mean something
    assert marker.exists()
    os.remove(marker)
