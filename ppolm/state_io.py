"""Pickle-free saving and loading of training state: optimizer, LR scheduler, RNG streams, JSON.

``torch.save``/``torch.load`` use pickle, and unpickling a file runs whatever code the file names, so a
checkpoint directory that someone else could write to becomes a way to run code on the training host.
Everything here is therefore written as two plain files per object:

* ``<prefix>.safetensors``: every tensor, under a readable key such as ``state.0.exp_avg``;
* ``<prefix>.json``: everything else (``param_groups`` with ``lr``/``betas``/..., scheduler counters,
  the Python and NumPy RNG states), with each tensor replaced by ``{"__tensor__": "<key>"}``.

JSON has no tuples, no integer dict keys and no NaN, yet ``state_dict()`` uses all three (``betas`` is a
tuple, ``state`` is keyed by parameter index), so the JSON side tags them (``__tuple__``, ``__dict__``,
``__float__``) and decoding rebuilds exactly the object that was saved. Floats survive JSON bit-exactly
because Python writes the shortest repr that parses back to the same double.

The only pickle-based reader is :func:`safe_torch_load`, kept for legacy ``pytorch_model.bin`` files and
restricted to ``weights_only=True`` (tensors and plain containers; any other global is refused).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ppolm.errors import CheckpointError

FORMAT = "ppolm.state/1"
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__float__")
_DROP = object()  # sentinel: "leave this value out" (see save_scheduler_state)


# ----------------------------------------------------------------------------------------------------
# Atomic files


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry to disk, so that a rename or a new file inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        # Some filesystems (and all of Windows) refuse fsync on directories; nothing more can be done there.
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    Writes a temporary file in the same directory, fsyncs it, ``os.replace``-s it over ``path`` and
    fsyncs the directory. A crash at any point leaves at most a stray ``.<name>.tmp-<pid>`` file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the call is not
    available (another OS, an old kernel or C library, a file system without it): nothing was changed then."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Write a whole directory atomically: the body fills the yielded temp directory (next to `dest`), then it
    is fsynced and swapped with `dest` in one atomic rename (``exchange_paths``). A crash leaves either the old
    `dest` or the new one, never a mix and never none (where renameat2 is missing, two renames: a crash between
    them leaves no `dest`); the temp directory of a failed write is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    old = dest.parent / f".old-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for dirpath, _, filenames in os.walk(tmp):
            for name in filenames:
                with open(Path(dirpath) / name, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(dirpath)
        if not dest.exists():
            os.replace(tmp, dest)
        elif not exchange_paths(tmp, dest):  # a swap leaves the old tree in tmp (removed below)
            # no renameat2 here: a directory cannot be renamed over a non-empty one, so move it aside first
            os.replace(dest, old)
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def save_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (strict: NaN/inf are refused, not written as ``NaN``)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def load_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file is a ``CheckpointError`` naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def safe_torch_load(path: str | Path) -> Any:
    """Load a legacy ``.bin`` file written by ``torch.save`` (e.g. ``pytorch_model.bin``), safely.

    Uses ``torch.load(weights_only=True)``: the unpickler only accepts tensors, primitive types and plain
    containers, so a file carrying a ``__reduce__`` payload fails instead of running it. New files must
    be written as safetensors; this exists only to read old model weights, hence the ``.bin`` check.
    """
    path = Path(path)
    if path.suffix != ".bin":
        raise CheckpointError(f"{path}: safe_torch_load only reads legacy .bin files; use safetensors")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except Exception as e:  # the unpickler raises many types; all mean "not a safe weights file"
        raise CheckpointError(
            f"{path}: refused to load ({_unpickler_reason(e)}); only plain tensor files are read, because "
            "anything else may run code; convert trusted weights to safetensors"
        ) from None


def _unpickler_reason(e: Exception) -> str:
    """The informative part of torch's long weights_only error (its advice to drop weights_only is not)."""
    match = re.search(r"Unsupported (global: GLOBAL [\w.]+|operand \d+)", str(e))
    if match:
        return f"unsupported {match.group(1)}"
    return type(e).__name__


# ----------------------------------------------------------------------------------------------------
# Tensors + JSON encoding of state dicts


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor], drop_unencodable: bool) -> Any:
    """Turn ``obj`` into JSON-able data, moving tensors into ``tensors`` under dotted keys like ``key``.

    Returns ``_DROP`` for a value that cannot be represented when ``drop_unencodable`` is set.
    """
    if isinstance(obj, torch.Tensor):
        name = key
        n = 1
        while name in tensors:  # two paths can join to the same dotted key if a name contains '.'
            name, n = f"{key}#{n}", n + 1
        # clone: safetensors refuses tensors sharing storage, and the saved copy must not alias live state
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, (list, tuple)):
        items = []
        for i, v in enumerate(obj):
            e = _encode(v, _join(key, i), tensors, drop_unencodable)
            items.append(None if e is _DROP else e)  # a list slot cannot vanish without shifting indices
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) and k not in _TAGS for k in obj)
        out_plain: dict[str, Any] = {}
        out_pairs: list[list[Any]] = []
        for k, v in obj.items():
            e = _encode(v, _join(key, k), tensors, drop_unencodable)
            if e is _DROP:
                continue
            if plain:
                out_plain[k] = e
            else:
                out_pairs.append([_encode(k, "", {}, False), e])
        return out_plain if plain else {"__dict__": out_pairs}
    if drop_unencodable:
        return _DROP
    raise CheckpointError(f"cannot save {key or 'value'}: {type(obj).__name__} is not a tensor or JSON value")


def _join(key: str, part: object) -> str:
    """Dotted tensor key: ``state`` + ``0`` -> ``state.0``."""
    return f"{key}.{part}" if key else str(part)


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    """Invert :func:`_encode`; ``where`` names the JSON file in error messages."""
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise CheckpointError(f"{where}: tensor '{value}' is missing from the .safetensors file")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors, where) for v in value)
        if tag == "__dict__":
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value}
        if tag == "__float__":
            return float(value)
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def save_state(state: Any, path_prefix: str | Path, kind: str, drop_unencodable: bool = False) -> None:
    """Save a nested state (dicts/lists/tuples of tensors and JSON values) as ``.safetensors`` + ``.json``.

    ``kind`` (e.g. ``"optimizer"``) is recorded and checked on load, so that files cannot be swapped.
    With ``drop_unencodable``, values that are neither tensors nor JSON (e.g. callables) are left out.
    The tensor file is written first: a reader goes through the JSON, so it never sees a JSON file
    pointing at tensors from a different save. Both writes are atomic.
    """
    prefix = Path(path_prefix)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors, drop_unencodable)
    st_path = prefix.with_name(prefix.name + ".safetensors")
    tmp = st_path.with_name(f".{st_path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "kind": kind})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, st_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    save_json(prefix.with_name(prefix.name + ".json"), {"format": FORMAT, "kind": kind, "state": encoded})


def load_state(path_prefix: str | Path, kind: str) -> Any:
    """Load what :func:`save_state` wrote; any missing, foreign or damaged file is a ``CheckpointError``."""
    prefix = Path(path_prefix)
    json_path = prefix.with_name(prefix.name + ".json")
    st_path = prefix.with_name(prefix.name + ".safetensors")
    doc = load_json(json_path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "state" not in doc:
        raise CheckpointError(f"{json_path}: not a ppolm state file (expected format '{FORMAT}')")
    if doc.get("kind") != kind:
        raise CheckpointError(f"{json_path}: holds '{doc.get('kind')}' state, expected '{kind}'")
    if not st_path.is_file():
        raise CheckpointError(f"{st_path}: file is missing")
    try:
        tensors = load_file(str(st_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{st_path}: not a valid safetensors file ({e})") from None
    return _decode(doc["state"], tensors, json_path)


# ----------------------------------------------------------------------------------------------------
# Optimizer and scheduler


def save_optimizer_state(optimizer: torch.optim.Optimizer, path_prefix: str | Path) -> None:
    """Write ``optimizer.state_dict()`` to ``<prefix>.safetensors`` (moments, ``step``) + ``<prefix>.json``.

    Tensor keys are ``state.<param_idx>.<name>``, e.g. ``state.0.exp_avg``; AdamW's ``step`` is a 0-d
    tensor and is saved as one, so the bias correction continues exactly.
    """
    save_state(optimizer.state_dict(), path_prefix, kind="optimizer")


def load_optimizer_state(optimizer: torch.optim.Optimizer, path_prefix: str | Path) -> None:
    """Restore state written by :func:`save_optimizer_state` into ``optimizer`` (built over the same params).

    ``Optimizer.load_state_dict`` moves each state tensor to its parameter's device and dtype.
    """
    state = load_state(path_prefix, kind="optimizer")
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path_prefix}.json: does not match this optimizer ({e})") from None


def save_scheduler_state(scheduler: Any, path_prefix: str | Path) -> None:
    """Write an LR scheduler's ``state_dict()``; values that are not JSON/tensors are left out.

    For ``LambdaLR`` this drops nothing that matters: plain functions are already ``None`` in the state
    dict, and callable objects keep only their JSON-able attributes; the lambdas themselves come from the
    code that rebuilds the scheduler.
    """
    save_state(scheduler.state_dict(), path_prefix, kind="scheduler", drop_unencodable=True)


def load_scheduler_state(scheduler: Any, path_prefix: str | Path) -> None:
    """Restore state written by :func:`save_scheduler_state` into a scheduler built the same way."""
    state = load_state(path_prefix, kind="scheduler")
    try:
        scheduler.load_state_dict(state)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path_prefix}.json: does not match this scheduler ({e})") from None


# ----------------------------------------------------------------------------------------------------
# RNG streams


def get_rng_state() -> dict[str, Any]:
    """Capture every RNG stream training draws from: Python ``random``, NumPy's global, torch CPU, CUDA.

    Returns ``{"python": ..., "numpy": ..., "torch": ByteTensor, "cuda": [ByteTensor per device]}``
    with the Python and NumPy parts already as plain ints/floats, so it can be saved without pickle.
    """
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available():
        cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore streams captured by :func:`get_rng_state`.

    CUDA states are restored for as many devices as both the saved state and this machine have; on a
    machine without CUDA they are ignored (the CPU streams still continue exactly).
    """
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
        npst = state["numpy"]
        np.random.set_state(
            (
                npst["bit_generator"],
                np.asarray(npst["keys"], dtype=np.uint32),
                npst["pos"],
                npst["has_gauss"],
                npst["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"].to(torch.uint8))
        if torch.cuda.is_available():
            for i, s in enumerate(state.get("cuda", [])[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.to(torch.uint8), i)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"RNG state is incomplete or malformed ({type(e).__name__}: {e})") from None


def save_rng_state(path_prefix: str | Path, states: list[dict[str, Any]] | None = None) -> None:
    """Save :func:`get_rng_state` as ``<prefix>.safetensors`` (torch/CUDA bytes) + ``<prefix>.json``.

    `states`: every process's state in rank order (gathered by the caller); rank 0's goes to ``<prefix>``,
    rank r's to ``<prefix>-rank<r>``, so each process of a resumed multi-process run continues its own streams.
    """
    states = states or [get_rng_state()]
    for rank, state in enumerate(states):
        save_state(state, path_prefix if rank == 0 else f"{path_prefix}-rank{rank}", kind="rng")


def load_rng_state(path_prefix: str | Path, rank: int = 0) -> None:
    """Load and apply this process's RNG state written by :func:`save_rng_state` (checkpoints written before
    per-rank states existed hold only rank 0's, which every process then takes, as they used to)."""
    own = f"{path_prefix}-rank{rank}"
    use_own = rank > 0 and Path(own + ".json").is_file()
    set_rng_state(load_state(own if use_own else path_prefix, kind="rng"))


__all__: list[str] = [
    "atomic_write_bytes",
    "fsync_dir",
    "get_rng_state",
    "load_json",
    "load_optimizer_state",
    "load_rng_state",
    "load_scheduler_state",
    "load_state",
    "safe_torch_load",
    "save_json",
    "save_optimizer_state",
    "save_rng_state",
    "save_scheduler_state",
    "save_state",
    "set_rng_state",
]
