"""What every trainer's resume checks: the run it continues is the run that wrote the checkpoint.

A checkpoint records a fingerprint of the config (the keys that define the computation), of the training
data and the process count. Resuming with a difference refuses, naming what changed, unless the user sets
`allow_changed_resume=true` (then it warns in one line and goes on).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel

from ppolm.errors import CheckpointError

# Keys that may change between a run and its resume without changing what is computed.
VOLATILE_KEYS = {"resume", "overwrite_output_dir", "max_steps", "output_dir", "allow_changed_resume", "log", "checkpoint",
                 "eval_every", "eval_batch_size"}


def config_fingerprint(config: BaseModel) -> dict:
    """The config fields that define the computation, flattened to 'a.b' -> value."""
    flat: dict = {}

    def walk(prefix: str, node: dict) -> None:
        for k, v in node.items():
            if not prefix and k in VOLATILE_KEYS:
                continue
            if isinstance(v, dict) and v:
                walk(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v

    dump = config.model_dump(mode="json")
    walk("", dump)
    # max_steps may change on resume (extend or shorten a run) only where it does not change the computation:
    # a decaying LR schedule is stretched over max_steps, so there it is part of the fingerprint (refused).
    if flat.get("optim.schedule", "constant") != "constant":
        flat["max_steps"] = dump.get("max_steps")
    return flat


def data_fingerprint(texts: list[str]) -> str:
    """sha256 over the training rows in order."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def check_same_run(state: dict, path: Path, *, config: BaseModel, data_fp: str, world_size: int,
                   allow_changed: bool, is_main: bool) -> None:
    """Refuse (CheckpointError) or warn when config, data or process count differ from the checkpoint's."""
    old, new = state.get("config", {}), config_fingerprint(config)
    # A key the checkpoint does not know (added to ppolm after it was written) at its default computes what
    # the older code did: not a change.
    defaults = config_fingerprint(type(config).model_construct())
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                     and not (k not in old and k in defaults and new.get(k) == defaults[k]))
    problems = []
    if changed:
        problems.append("config changed: " + ", ".join(
            f"{k} ({json.dumps(old.get(k))} -> {json.dumps(new.get(k))})" for k in changed[:5]))
    if state.get("data") != data_fp:
        problems.append("training data changed")
    if state.get("world_size", world_size) != world_size:
        problems.append(f"process count changed ({state['world_size']} -> {world_size})")
    if not problems:
        return
    msg = f"cannot resume from {path}: " + "; ".join(problems)
    if not allow_changed:
        raise CheckpointError(msg + " (set allow_changed_resume=true to resume anyway)")
    if is_main:
        print("warning: " + msg.replace("cannot resume", "resuming"))
