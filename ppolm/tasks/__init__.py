"""Tasks: the contract (base.py) and the built-in tasks, looked up by name."""

from __future__ import annotations

import difflib
import importlib

from pydantic import ValidationError

from ppolm.errors import ConfigError
from ppolm.tasks.base import Decoding, Example, Task, TaskOptions

BUILTIN = {
    "toy": "ppolm.tasks.toy:ToyTask",
    "classification": "ppolm.tasks.classification:ClassificationTask",
    "ner": "ppolm.tasks.ner:NERTask",
    "translation": "ppolm.tasks.translation:TranslationTask",
    "generation": "ppolm.tasks.generation:GenerationTask",
}


def task_class(name: str) -> type[Task]:
    """Resolve a built-in name or 'module:attr' to a Task subclass."""
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ConfigError(f"task.name '{name}': unknown (allowed: {', '.join(BUILTIN)}, or 'module:Class')")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task.name '{name}': cannot import ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task.name '{name}': {target} is not a ppolm Task subclass")
    return cls


def build_task(name: str, options: dict) -> Task:
    """Instantiate a task with validated options (ConfigError naming the option on failure)."""
    cls = task_class(name)
    try:
        return cls(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        allowed = ", ".join(cls.Options.model_fields)
        hint = difflib.get_close_matches(str(err["loc"][-1]), list(cls.Options.model_fields), n=1)
        did = f"; did you mean '{hint[0]}'?" if hint and err["type"] == "extra_forbidden" else ""
        raise ConfigError(f"task.options.{key}: {err['msg']}{did} (options of '{name}': {allowed})") from None


__all__ = ["BUILTIN", "Decoding", "Example", "Task", "TaskOptions", "build_task", "task_class"]
