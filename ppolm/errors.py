"""User-facing errors.

Every error a user can cause (bad config, bad data file, missing model) is a ``PpolmError``: the CLI
prints its message as one line and exits with its ``exit_code`` (2 for bad input; 3 for a diverged run,
``ppolm.update.TrainingAborted``), with no traceback unless ``--debug``.
"""

from __future__ import annotations

from pathlib import Path


class PpolmError(Exception):
    """An error caused by user input; its message is a complete one-line explanation."""

    exit_code = 2


class ConfigError(PpolmError):
    """An invalid configuration key or value (raised before any model loads)."""


class DataError(PpolmError):
    """A malformed data file: the message names the file, the line (1-based) and the field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, reason: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {reason}")


class ModelLoadError(PpolmError):
    """A model or tokenizer that cannot be loaded (unknown name, offline hub id, broken directory)."""


class CheckpointError(PpolmError):
    """A checkpoint that is incomplete, damaged or does not match the run."""
