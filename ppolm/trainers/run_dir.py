"""The run directory's lifecycle, shared by every trainer: refusing to mix two runs in one output_dir, and
stopping on SIGTERM/SIGINT with a checkpoint instead of losing the steps since the last one.
"""

from __future__ import annotations

import re
import shutil
import signal
import threading
from pathlib import Path

from ppolm.errors import ConfigError, PpolmError

# What a run writes into output_dir. A directory holding any of them belongs to a run; config.yaml alone
# (a run that stopped before its first step) does not count.
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "LATEST", "final", "tensorboard")
RUN_DIR_RE = re.compile(r"(checkpoint-\d+|\.tmp-checkpoint-.*)$")


def run_artifacts(output_dir: str | Path) -> list[Path]:
    """The entries of output_dir that a previous run wrote, sorted by name."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name in RUN_FILES or RUN_DIR_RE.match(p.name))


def prepare_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool, is_main: bool) -> None:
    """Refuse a fresh run into a used output_dir (its metrics would be deleted and its checkpoints mixed into
    pruning and resume fallback) unless `resume` continues it or `overwrite` replaces it (main process removes
    the old run's files). Raises ConfigError (one line, exit 2) before any model loads."""
    if resume:
        return
    used = run_artifacts(output_dir)
    if not used:
        return
    if not overwrite:
        names = ", ".join(p.name for p in used[:3]) + (", ..." if len(used) > 3 else "")
        raise ConfigError(f"output_dir '{output_dir}' already holds a run ({names}): set resume=true to continue "
                          "it, overwrite_output_dir=true to replace it, or choose another output_dir")
    if is_main:
        for p in used:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


class RunStopped(PpolmError):
    """SIGTERM/SIGINT arrived: the run saved a checkpoint at the last finished step and stopped."""

    exit_code = 130


class StopSignals:
    """Between `install()` and `restore()`, SIGTERM and SIGINT only set `signum`: the loop finishes the step it
    is in (never killed mid-write), saves a checkpoint and raises RunStopped. A second signal interrupts at
    once. Handlers are installed only in the main thread (signal's rule); elsewhere this is a no-op."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def requested(self, runtime) -> bool:
        """True on every process when any process received a signal (so all save the same step)."""
        return runtime.broadcast_flag(self.signum is not None)

    def stopped(self, step: int) -> RunStopped:
        name = signal.Signals(self.signum).name if self.signum is not None else "a signal"
        return RunStopped(f"stopped by {name} after step {step}: saved checkpoint-{step}; "
                          "continue with resume=true")
