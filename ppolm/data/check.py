"""Check a data file for a task before training on it: read, validate, clean, and report what was found.

``check_file`` decides from the task which fields are required (classification: text + label; ner:
tokens + tags from CoNLL; translation: source + target from a pair of line-aligned files or a TSV of
pairs; generation: prompt or text), recognises a few common layouts (a headerless AG News style CSV,
``val.en``/``val.de`` siblings, a Tatoeba TSV), and returns a ``CheckReport`` whose ``format()`` is the
text that ``ppolm data check`` prints. Every problem is a one-line ``DataError``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppolm.data.clean import clean_records
from ppolm.data.readers import (
    EXTENSIONS, Record, check_fields, detect_format, iob1_to_iob2, missing_reason, read_parallel, read_records,
)
from ppolm.errors import ConfigError, DataError

TASKS = ("classification", "ner", "translation", "generation")
_LABELS = ("label", "labels", "class", "class_index", "category")
_CLASS_TEXTS = ("title", "text", "sentence", "review", "content", "description", "document")
_ANY_TEXTS = ("prompt", "text", "source", "target", "tokens", "sentence", "title", "description", "review")
_LANG_SUFFIX = re.compile(r"\.[a-z]{2,3}(?:[-_][a-z]{2,4})?")
_NOT_LANG = {".md", ".py", ".sh", ".gz", ".js", ".ts", ".db", ".pt", ".bin", ".zip", ".yml", ".cfg", ".log"}


@dataclass
class CheckReport:
    """What ``check_file`` found; ``format()`` renders it for a terminal."""

    path: str
    file_format: str
    task: str | None
    rows_read: int
    rows_kept: int
    dropped: dict[str, int]
    fields: list[str]
    text_fields: list[str]
    label_field: str | None = None
    label_counts: dict[str, int] = field(default_factory=dict)
    # text field -> {"p5", "p50", "p95", "max"} of its length in characters (tokens: with a tokenizer)
    char_lengths: dict[str, dict[str, int]] = field(default_factory=dict)
    token_lengths: dict[str, dict[str, int]] | None = None
    changed: int = 0
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """A multi-line human-readable summary."""
        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{k}={v}" for k, v in self.dropped.items())
        lines = [
            f"file:      {self.path}",
            f"format:    {self.file_format}",
            f"task:      {self.task or 'none'}",
            f"rows:      read {self.rows_read}, kept {self.rows_kept}, dropped {dropped} ({reasons})",
            f"fields:    {len(self.fields)} ({', '.join(self.fields)}); text: {', '.join(self.text_fields)}",
        ]
        if self.changed:
            lines.append(f"cleaned:   {self.changed} kept rows had Unicode or whitespace normalised")
        if self.label_counts:
            counts = ", ".join(f"{k}={v}" for k, v in self.label_counts.items())
            lines.append(f"labels:    {self.label_field}: {len(self.label_counts)} values: {counts}")
        for title, table in (("chars", self.char_lengths), ("tokens", self.token_lengths or {})):
            for i, (name, pct) in enumerate(table.items()):
                stats = " ".join(f"{k}={v}" for k, v in pct.items())
                lines.append(f"{title + ':' if i == 0 else '':<10} {name}: {stats}")
        lines += [f"note:      {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass
class _Plan:
    """How a task reads a file: the records and the roles of their fields."""

    records: list[Record]
    format: str
    text_fields: list[str]
    label_field: str | None = None
    notes: list[str] = field(default_factory=list)


def check_file(
    path: str | Path,
    *,
    task: str | None = None,
    tokenizer: Any = None,
    columns: list[str] | None = None,
    format: str | None = None,
    target: str | Path | None = None,
) -> CheckReport:
    """Read ``path`` as data for ``task`` (None: guessed), validate and clean it, and report statistics.

    ``tokenizer`` (a Hugging Face tokenizer) adds token-length percentiles. ``columns`` names the columns
    of a headerless CSV/TSV; ``format`` overrides the extension; ``target`` is the aligned target file of
    a translation source file (default: the sibling with another language suffix, ``val.en`` -> ``val.de``).
    """
    path = Path(path)
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task '{task}'; expected one of {', '.join(TASKS)}")
    if not path.exists():
        raise DataError(path, None, None, "no such file or directory")
    task = task or _guess_task(path, format, target)
    if task == "classification":
        plan = _plan_classification(path, columns, format)
    elif task == "ner":
        plan = _plan_ner(path, format)
    elif task == "translation":
        plan = _plan_translation(path, columns, format, target)
    elif task == "generation":
        plan = _plan_generation(path, columns, format)
    else:
        plan = _plan_any(path, columns, format)
    kept, stats = clean_records(plan.records, text_fields=plan.text_fields)
    report = CheckReport(
        path=str(path), file_format=plan.format, task=task, rows_read=len(plan.records), rows_kept=len(kept),
        dropped=dict(stats.dropped), fields=_field_names(plan.records), text_fields=plan.text_fields,
        label_field=plan.label_field, changed=stats.changed, notes=plan.notes,
    )
    if plan.label_field:
        report.label_counts = _label_counts(kept, plan.label_field, entities=task == "ner")
    texts = {name: [_as_text(rec.fields[name]) for rec in kept] for name in plan.text_fields}
    report.char_lengths = {name: percentiles([len(t) for t in ts]) for name, ts in texts.items()}
    if tokenizer is not None:
        report.token_lengths = {name: percentiles(token_lengths(tokenizer, ts)) for name, ts in texts.items()}
    return report


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank p5, p50, p95 and max of ``values`` (all 0 for an empty list)."""
    if not values:
        return {"p5": 0, "p50": 0, "p95": 0, "max": 0}
    ordered = sorted(values)
    rank = {p: ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in (5, 50, 95)}
    return {"p5": rank[5], "p50": rank[50], "p95": rank[95], "max": ordered[-1]}


def token_lengths(tokenizer: Any, texts: list[str], batch_size: int = 1024) -> list[int]:
    """Number of tokens of each text, without special tokens (BOS/EOS are added by the task later)."""
    out: list[int] = []
    for i in range(0, len(texts), batch_size):
        out += [len(ids) for ids in tokenizer(texts[i:i + batch_size], add_special_tokens=False)["input_ids"]]
    return out


def headerless_class_columns(path: Path, fmt: str) -> tuple[list[str], str] | None:
    """Column names (and a note) for a headerless classification file whose integer class column tells it
    apart from a header: AG News ``class,title,description`` and ``sentence<TAB>label`` (UCI Sentiment
    Labelled Sentences, SST-2 exports). None when the first row does not look like one of these."""
    if fmt not in ("csv", "tsv"):
        return None
    first = first_csv_row(path, "," if fmt == "csv" else "\t")
    if not first or len(first) not in (2, 3):
        return None
    if first[0].strip().lstrip("-").isdigit():
        columns = ["label", "text"] if len(first) == 2 else ["label", "title", "text"]
        return columns, f"headerless {fmt.upper()} with an integer class first (AG News layout)"
    if len(first) == 2 and first[1].strip().lstrip("-").isdigit():
        return ["text", "label"], f"headerless {fmt.upper()} of sentence and integer label"
    return None


def _plan_classification(path: Path, columns: list[str] | None, format: str | None) -> _Plan:
    fmt = detect_format(path, format)
    notes = []
    found = headerless_class_columns(path, fmt) if columns is None else None
    if found is not None:
        columns = found[0]
        notes.append(f"{found[1]}: columns named {', '.join(columns)}")
    records = read_records(path, format=fmt, columns=columns)
    names = _field_names(records)
    label = next((n for n in _LABELS if n in names), None) or _missing(path, fmt, columns, records, "label", names)
    texts = [n for n in _CLASS_TEXTS if n in names] or [_missing(path, fmt, columns, records, "text", names)]
    records = check_fields(records, [label, *texts], {label: (int, str), **dict.fromkeys(texts, str)})
    return _Plan(records, _describe(fmt, columns), texts, label, notes)


def _plan_ner(path: Path, format: str | None) -> _Plan:
    structured = path.is_dir() or path.suffix.lower() in (".jsonl", ".json", ".parquet")
    fmt = detect_format(path, format) if format or structured else "conll"
    records = read_records(path, format=fmt, required=["tokens", "tags"], field_types={"tokens": list, "tags": list})
    notes = []
    for rec in records:
        if len(rec["tokens"]) != len(rec["tags"]):
            raise DataError(rec.source, rec.line, "tags", f"{len(rec['tags'])} tags for {len(rec['tokens'])} tokens")
    string_tags = all(isinstance(t, str) for rec in records for t in rec["tags"])
    if string_tags:
        iob1 = sum(iob1_to_iob2(rec["tags"]) != rec["tags"] for rec in records)
        notes.append(f"tag scheme IOB1 ({iob1} sentences have a chunk starting with I-; use iob1_to_iob2)"
                     if iob1 else "tag scheme IOB2 (every chunk starts with B-)")
    notes.append(f"{sum(len(rec['tokens']) for rec in records)} tokens; labels count entities (chunks) by type")
    return _Plan(records, fmt, ["tokens"], "tags" if string_tags else None, notes)


def _plan_translation(path: Path, columns: list[str] | None, format: str | None, target: str | Path | None) -> _Plan:
    if target is not None or (format is None and _is_language_file(path)):
        tgt = Path(target) if target is not None else _sibling(path)
        records = read_parallel(path, tgt)
        return _Plan(records, f"parallel text ({path.name} -> {tgt.name})", ["source", "target"], None,
                     [f"target file: {tgt}"])
    fmt = detect_format(path, format)
    notes = []
    if fmt == "tsv" and columns is None:
        first = _first_line(path).split("\t")
        if not {"source", "target"} <= {c.strip().lower() for c in first}:
            columns = ["source", "target"] + [f"col{i}" for i in range(3, len(first) + 1)]
            notes.append(f"TSV of pairs without header: columns named {', '.join(columns)}")
    elif fmt == "text":
        raise DataError(path, None, None, "plain text holds one side only: pass the source file of a parallel "
                        "pair (e.g. val.en next to val.de) or a TSV of pairs")
    records = read_records(path, format=fmt, columns=columns, header=columns is None if fmt == "tsv" else None)
    names = _field_names(records)
    for name in ("source", "target"):
        if name not in names:
            _missing(path, fmt, columns, records, name, names)
    records = check_fields(records, ["source", "target"], {"source": str, "target": str})
    return _Plan(records, _describe(fmt, columns), ["source", "target"], None, notes)


def _plan_generation(path: Path, columns: list[str] | None, format: str | None) -> _Plan:
    fmt = detect_format(path, format)
    records = read_records(path, format=fmt, columns=columns)
    names = _field_names(records)
    text = next((n for n in ("prompt", "text") if n in names), None)
    if text is None:
        guess = "text" if "did you mean" in missing_reason("text", names) else "prompt"
        _missing(path, fmt, columns, records, guess, names)
    records = check_fields(records, [text], {text: str})
    label = next((n for n in _LABELS if n in names), None)
    return _Plan(records, _describe(fmt, columns), [text], label)


def _plan_any(path: Path, columns: list[str] | None, format: str | None) -> _Plan:
    fmt = detect_format(path, format)
    records = read_records(path, format=fmt, columns=columns)
    names = _field_names(records)
    texts = [n for n in _ANY_TEXTS if n in names]
    texts = texts or [n for n in names if isinstance(records[0].fields.get(n), str)]
    if not texts:
        raise DataError(path, None, None, f"no text field found among {', '.join(names)}; pass task= to say "
                        "which fields to expect")
    label = next((n for n in _LABELS if n in names), None) if fmt != "conll" else "tags"
    return _Plan(records, _describe(fmt, columns), texts, label)


def _guess_task(path: Path, format: str | None, target: str | Path | None) -> str | None:
    if format == "conll" or (format is None and path.suffix.lower() in (".conll", ".iob")):
        return "ner"
    if format is None and path.suffix.lower() not in EXTENSIONS and _looks_like_conll(path):
        return "ner"  # e.g. WNUT-17's emerging.test.annotated: token<TAB>tag lines, blank between sentences
    if (format is None and path.suffix.lower() == ".csv" and (first := first_csv_row(path))
            and len(first) in (2, 3) and first[0].strip().isdigit()):
        return "classification"  # a headerless CSV with an integer class first (AG News layout)
    if target is not None or (format is None and _is_language_file(path) and _siblings(path)):
        return "translation"
    return None


def _looks_like_conll(path: Path, probe: int = 20) -> bool:
    """The first lines hold 2+ columns whose last is an IOB tag, and a blank line separates sentences."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            lines = [next(f, "") for _ in range(200)]
    except OSError:
        return False
    rows = [ln.split() for ln in lines if ln.strip()][:probe]
    tag = re.compile(r"^(O|[BIES]-\S+)$")
    return (len(rows) >= 2 and all(len(r) >= 2 and tag.match(r[-1]) for r in rows)
            and any(not ln.strip() for ln in lines if ln))


def _is_language_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    return (path.is_file() and suffix not in EXTENSIONS and suffix not in _NOT_LANG
            and bool(_LANG_SUFFIX.fullmatch(suffix)))


def _siblings(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir()
                  if p != path and p.stem == path.stem and _is_language_file(p))


def _sibling(path: Path) -> Path:
    found = _siblings(path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(path, None, None, f"no target file: expected a sibling {path.stem}.<lang> "
                        "with another language suffix next to it (e.g. val.en + val.de)")
    raise DataError(path, None, None, f"several possible target files ({', '.join(p.name for p in found)}); "
                    "pass target= to choose one")


def _missing(path: Path, fmt: str, columns: list[str] | None, records: list[Record], name: str,
             names: list[str]) -> str:
    """Raise the DataError for a role no record has: at the header line, else at the first record."""
    line: int | None = records[0].line
    if fmt in ("csv", "tsv") and columns is None:
        line = 1
    elif fmt in ("parquet", "dataset") or columns is not None:
        line = None
    raise DataError(path, line, name, missing_reason(name, names))


def _label_counts(records: list[Record], name: str, entities: bool) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for rec in records:
        if name not in rec.fields:
            # the label field was chosen because some rows have it: a row without it is malformed
            raise DataError(rec.source, rec.line, name, "missing in this row (other rows have it)")
        if entities:
            counts.update(t[2:] for t in iob1_to_iob2(rec[name]) if t.startswith("B-"))
        else:
            counts[str(rec[name])] += 1
    return dict(sorted(counts.items()))


def _field_names(records: list[Record]) -> list[str]:
    names: dict[str, None] = {}
    for rec in records:
        names.update(dict.fromkeys(rec.fields))
    return list(names)


def _as_text(value: Any) -> str:
    return " ".join(value) if isinstance(value, list) else value


def _describe(fmt: str, columns: list[str] | None) -> str:
    return f"{fmt} (no header; columns {', '.join(columns)})" if columns else fmt


def _first_line(path: Path, limit: int = 1 << 16) -> str:
    with open(path, "rb") as f:
        head = f.read(limit)
    return head.decode("utf-8-sig", errors="replace").split("\n", 1)[0].rstrip("\r")


def first_csv_row(path: Path, delimiter: str = ",") -> list[str] | None:
    """The first CSV (or TSV, ``delimiter="\\t"``) row, or None when it cannot be parsed (read_records then
    reports the error)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("utf-8-sig", errors="replace")
    try:
        return next(csv.reader(io.StringIO(head, newline=""), delimiter=delimiter, strict=True), None)
    except csv.Error:
        return None
