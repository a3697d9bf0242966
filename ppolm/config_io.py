"""Reading and writing configs: YAML files with dotted `key=value` overrides, validated into the typed
sections of `ppolm.config`; one-line errors naming the offending key; the resolved config saved with a run;
`--describe` rows. Re-exported by `ppolm.config`, where callers import them from."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ppolm.errors import ConfigError

C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=1' -> (['a', 'b'], 1); the value is parsed as YAML so numbers, bools, null and lists work."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def _section_class(ann: Any) -> type[BaseModel] | None:
    """The config section class inside an annotation: X, list[X], X | None -> X."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section at `loc` (for 'unknown key' messages); list positions are skipped."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = next((f for n, f in cls.model_fields.items() if str(part) in (n, f.alias)), None)
        section = _section_class(getattr(field, "annotation", None))
        if section is None:
            return []
        cls = section
    return [f.alias or name for name, f in cls.model_fields.items()]


def format_validation_error(cls: type[BaseModel], exc: ValidationError, source: str) -> str:
    """One line naming the first offending key and what is allowed."""
    err = exc.errors()[0]
    loc = tuple(err.get("loc", ()))
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(cls, loc)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        did = f"; did you mean '{hint[0]}'?" if hint else ""
        return f"{source}: unknown key '{key}'{did} (allowed here: {', '.join(allowed)})"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if key == "(top level)":
        return f"{source}: {msg}"
    return f"{source}: key '{key}': {msg} (got {shown})"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently, so
    the first setting would be lost without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read YAML `path` (optional), apply dotted overrides, validate into `cls`. Raises ConfigError."""
    data: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    for item in overrides or []:
        keys, value = parse_override(item)
        _set_path(data, keys, value)
        source = source if path is not None else "override"
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(cls, exc, source)) from None


def save_config(config: BaseModel, output_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config (every field, defaults included) as YAML into output_dir."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return path


def describe(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) rows for every field, recursively: the source of `ppolm ppo --describe`."""
    rows = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append((key, "", field.description or ""))
            rows.extend(describe(ann, key + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((key, repr(default), field.description or ""))
    return rows
