"""Crash-safe checkpoint directories: write to a temp dir, fsync, manifest, rename, point ``LATEST`` at it.

A checkpoint is a directory ``<run_dir>/checkpoint-<step>/`` holding whatever the trainer writes (model
safetensors, optimizer/RNG state from :mod:`ppolm.state_io`, JSON) plus ``manifest.json`` listing every
file with its size and sha256. The save protocol, in the order a crash can interrupt it:

1. ``.tmp-checkpoint-<step>-<pid>/`` is created and filled by the trainer's ``write_fn``;
2. every file and directory in it is fsynced, then ``manifest.json`` is written and fsynced;
3. the directory is renamed to ``checkpoint-<step>`` and ``run_dir`` is fsynced (the commit point);
4. ``LATEST`` (a one-line text file naming the directory) is replaced atomically;
5. only then are checkpoints beyond ``keep`` deleted.

A crash before 3 leaves only a ``.tmp-*`` directory, which :meth:`CheckpointManager.latest_valid`
removes. A crash between 3 and 4 leaves ``LATEST`` on the previous checkpoint, which is still complete.
Bit rot or a half-copied directory is caught by :meth:`CheckpointManager.verify`, and ``latest_valid``
falls back to the newest older checkpoint that verifies.

The manifest protects itself too: it is written in one canonical form and carries the sha256 of its
own body, so any changed byte in it is detected rather than silently changing what is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ppolm.errors import CheckpointError
from ppolm.state_io import atomic_write_bytes, fsync_dir

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ppolm.checkpoint/1"
_CHUNK = 1 << 20  # hash in 1 MiB chunks so multi-GB weight files never sit in memory


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    """The one byte form a manifest is written in; verification re-serializes and compares."""
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _fsync_tree(root: Path) -> list[Path]:
    """Fsync every regular file and directory under ``root``; return the files, relative, sorted."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for name in dirnames:
            if (d / name).is_symlink():
                raise ValueError(f"checkpoint write_fn created a symlink {d / name}; write real files")
        for name in filenames:
            p = d / name
            if p.is_symlink() or not p.is_file():
                raise ValueError(f"checkpoint write_fn created {p}, which is not a regular file")
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files.append(p.relative_to(root))
        fsync_dir(d)
    return sorted(files, key=lambda p: p.as_posix())


def _remove_tree(path: Path) -> None:
    """Delete a directory without ever leaving a half-deleted one under a checkpoint name.

    Renaming to a ``.tmp-*`` name first means a crash during ``rmtree`` leaves a stale temp directory
    (cleaned up later) instead of a ``checkpoint-N`` that is missing files.
    """
    doomed = path.with_name(f".tmp-{path.name}-{os.getpid()}-deleting")
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


class CheckpointManager:
    """Saves, verifies, finds and prunes the checkpoints of one run.

    ``keep``: how many complete checkpoints to keep (newest by step; the one just saved is always kept);
    ``None`` keeps all. ``prefix``: directory names are ``<prefix>-<step>``; the pointer file is
    ``LATEST`` for the default prefix and ``LATEST-<prefix>`` otherwise, so two managers can share a
    run directory. Only one process (rank 0) may save into a run directory at a time.
    """

    def __init__(self, run_dir: str | Path, keep: int | None = None, prefix: str = "checkpoint"):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", prefix):
            raise ValueError(f"prefix must be a plain file-name stem, got {prefix!r}")
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.prefix = prefix
        self.latest_file = self.run_dir / ("LATEST" if prefix == "checkpoint" else f"LATEST-{prefix}")
        self._name_re = re.compile(rf"{re.escape(prefix)}-(\d+)")
        # exact shape, so that prefix "checkpoint" never touches another manager's ".tmp-checkpoint-best-*"
        self._temp_re = re.compile(rf"\.tmp-{re.escape(prefix)}-\d+-\d+(-deleting|-shards)?")

    # ------------------------------------------------------------------------------------------------
    # Saving

    def save(self, step: int, write_fn: Callable[[Path], None]) -> Path:
        """Write checkpoint ``step`` crash-safely and return its final directory.

        ``write_fn(tmp_dir)`` writes the checkpoint's files into ``tmp_dir`` (sub-directories allowed,
        but not a file named ``manifest.json``). If it raises, the temp directory is removed, no
        ``<prefix>-<step>`` appears and ``LATEST`` is untouched. An existing checkpoint with the same
        step is replaced; a crash in the instant between moving it aside and renaming the new one in
        loses that step, and ``latest_valid`` then falls back to the one before.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        name = f"{self.prefix}-{step}"
        tmp = self.run_dir / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():  # left by an earlier crashed save that happened to get the same pid
            shutil.rmtree(tmp)
        try:
            tmp.mkdir()
            write_fn(tmp)
            if (tmp / MANIFEST).exists():
                raise ValueError(f"write_fn must not write {MANIFEST}; the checkpoint manager writes it")
            files = _fsync_tree(tmp)
            entries = [
                {"path": rel.as_posix(), "size": (tmp / rel).stat().st_size, "sha256": sha256_file(tmp / rel)}
                for rel in files
            ]
            body = {"format": MANIFEST_FORMAT, "step": step, "created": time.time(), "files": entries}
            manifest = dict(body, manifest_sha256=hashlib.sha256(_canonical(body)).hexdigest())
            with open(tmp / MANIFEST, "wb") as f:
                f.write(_canonical(manifest))
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        final = self.run_dir / name
        if final.exists():
            # rename() cannot replace a non-empty directory; move the old one to a temp name first
            _remove_tree(final)
        os.rename(tmp, final)
        fsync_dir(self.run_dir)
        atomic_write_bytes(self.latest_file, (name + "\n").encode("utf-8"))
        self._prune(keep_also=final)
        return final

    def rewind(self, step: int) -> None:
        """Delete every checkpoint after ``step`` and point ``LATEST`` at the newest one left (no ``LATEST``
        when none is left), so that a resume continues from there. After a guard stop: the checkpoints past the
        best held-out check are on the way to the failure the guard caught."""
        for s, path in self.list_complete():
            if s > step:
                _remove_tree(path)
        left = self.list_complete()
        if left:
            atomic_write_bytes(self.latest_file, (left[0][1].name + "\n").encode("utf-8"))
        else:
            self.latest_file.unlink(missing_ok=True)
        fsync_dir(self.run_dir)

    def staging_dir(self, step: int) -> Path:
        """Where every process of a sharded save writes its shards before the main process moves them into the
        checkpoint inside :meth:`save`; a ``.tmp-*`` name, so a crash before that leaves a stale temp dir."""
        return self.run_dir / f".tmp-{self.prefix}-{step}-{os.getpid()}-shards"

    def _prune(self, keep_also: Path) -> None:
        """Delete complete checkpoints beyond the newest ``keep`` (never ``keep_also``)."""
        if self.keep is None:
            return
        complete = self.list_complete()  # descending step
        survivors = {p for _, p in complete[: self.keep]} | {keep_also}
        for _, path in complete:
            if path not in survivors:
                _remove_tree(path)

    # ------------------------------------------------------------------------------------------------
    # Finding and checking

    def list_complete(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every committed ``<prefix>-<step>`` directory, highest step first.

        "Complete" means the save reached its rename; the files may still have been damaged since,
        which :meth:`verify` checks.
        """
        if not self.run_dir.is_dir():
            return []
        found = []
        for p in self.run_dir.iterdir():
            m = self._name_re.fullmatch(p.name)
            if m and p.is_dir() and not p.is_symlink():
                found.append((int(m.group(1)), p))
        return sorted(found, key=lambda sp: sp[0], reverse=True)

    def verify(self, path: str | Path) -> None:
        """Raise ``CheckpointError`` if ``path`` is not exactly what its manifest says.

        Checks that the manifest exists and is intact, and that every listed file exists with the
        listed size and sha256. Files that are not listed are ignored.
        """
        path = Path(path)
        problem = _find_problem(path)
        if problem is not None:
            file, what = problem
            raise CheckpointError(f"{path.name} is damaged ({file}: {what}) [{path}]")

    def latest_valid(self, log: Callable[[str], None] = print) -> Path | None:
        """Return the checkpoint to resume from, or ``None`` if there is no valid one.

        Removes stale ``.tmp-*`` directories left by interrupted saves (one log line). Then tries the
        checkpoint named in ``LATEST`` and, if it is damaged, the older complete ones from the highest
        step down. If ``LATEST`` is missing or names nothing usable, every complete checkpoint is tried
        from the highest step down. Any fallback is explained in one log line.
        """
        self._remove_stale_temps(log)
        complete = self.list_complete()
        notes: list[str] = []
        latest = self._read_latest()
        if isinstance(latest, tuple):
            latest_step, latest_path = latest
            candidates = [latest_path] + [p for s, p in complete if s < latest_step]
        else:
            if complete:
                notes.append(latest or f"{self.latest_file.name} is missing")
            candidates = [p for _, p in complete]

        for path in candidates:
            problem = _find_problem(path)
            if problem is None:
                if notes:
                    log(f"{'; '.join(notes)}; falling back to {path.name}")
                return path
            notes.append(f"{path.name} is damaged ({problem[0]}: {problem[1]})")
        if notes:
            log(f"{'; '.join(notes)}; no valid checkpoint left in {self.run_dir}")
        return None

    def _read_latest(self) -> tuple[int, Path] | str:
        """``(step, path)`` if ``LATEST`` names an existing checkpoint, else why not ('' if absent)."""
        try:
            text = self.latest_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return ""
        except (OSError, UnicodeDecodeError):
            return f"{self.latest_file.name} is unreadable"
        m = self._name_re.fullmatch(text)
        if not m:
            return f"{self.latest_file.name} is corrupt"
        path = self.run_dir / text
        if not path.is_dir():
            return f"{self.latest_file.name} names {text}, which does not exist"
        return int(m.group(1)), path

    def _remove_stale_temps(self, log: Callable[[str], None]) -> None:
        """Delete ``.tmp-<prefix>-*`` directories: saves (or deletions) that a crash interrupted."""
        if not self.run_dir.is_dir():
            return
        stale = sorted(p for p in self.run_dir.iterdir() if self._temp_re.fullmatch(p.name) and p.is_dir())
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        if stale:
            names = ", ".join(p.name for p in stale)
            log(f"removed {len(stale)} stale temporary checkpoint dir(s) from interrupted saves: {names}")


def _find_problem(path: Path) -> tuple[str, str] | None:
    """``(file, what is wrong)`` for the first problem in checkpoint ``path``, or ``None`` if intact."""
    if not path.is_dir():
        return ".", "not a directory"
    mpath = path / MANIFEST
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        return MANIFEST, "missing"
    except OSError as e:
        return MANIFEST, f"unreadable ({e.strerror})"
    try:
        manifest = json.loads(raw.decode("utf-8"))
        body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
        intact = _canonical(manifest) == raw and manifest["manifest_sha256"] == hashlib.sha256(
            _canonical(body)
        ).hexdigest()
        files = manifest["files"]
        ok_format = manifest["format"] == MANIFEST_FORMAT and isinstance(files, list)
    except (UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError):
        return MANIFEST, "not a valid manifest"
    if not ok_format:
        return MANIFEST, "not a valid manifest"
    if not intact:
        return MANIFEST, "checksum mismatch"
    named = re.fullmatch(r".*-(\d+)", path.name)
    if named and manifest.get("step") != int(named.group(1)):
        return MANIFEST, f"records step {manifest.get('step')}, not the step in the directory name"
    for entry in files:
        try:
            rel, size, digest = entry["path"], int(entry["size"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            return MANIFEST, "not a valid manifest"
        # A manifest is data from disk: never let it point outside the checkpoint directory.
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts or rel == MANIFEST:
            return MANIFEST, f"bad file path {rel!r}"
        p = path / rel
        if not p.is_file():
            return rel, "missing"
        actual = p.stat().st_size
        if actual != size:
            return rel, f"size mismatch, {actual} bytes instead of {size}"
        if sha256_file(p) != digest:
            return rel, "checksum mismatch"
    return None


__all__ = ["CheckpointManager", "MANIFEST", "sha256_file"]
