"""Read task data files into records that remember where they came from.

Formats: JSON lines (``.jsonl``/``.json``, or one top-level JSON array), CSV, TSV, plain text (one record
per line), parquet, a folder written by ``datasets.save_to_disk``, CoNLL (token first column, tag last
column, blank line between sentences) and line-aligned parallel text (``read_parallel``).

Every malformed input raises exactly one ``DataError`` whose one-line message names the file, the 1-based
line and the field, so a user can open the file at the right place. A UTF-8 byte-order mark is stripped
silently. For parquet and saved datasets ``Record.line`` is the 1-based row number.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppolm.errors import DataError

FORMATS = ("jsonl", "json", "csv", "tsv", "text", "conll", "parquet", "dataset")
EXTENSIONS = {
    ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
    ".conll": "conll", ".iob": "conll", ".txt": "txt",
}
# Formats read line by line: an error on a last line without a newline is reported as a truncation.
_LINE_FORMATS = ("jsonl", "json", "csv", "tsv", "text", "conll")
_TAG = re.compile(r"^(O|[BIES]-\S+)$")
_NUMBER = re.compile(r"^[+-]?\d+(\.\d*)?$")
# Text files are read whole into memory: past this size, a clear error instead of swapping (parquet and
# dataset directories are read column-wise and have no such cap).
MAX_TEXT_FILE_BYTES = 1 << 30
# Some CSV exports hold whole documents in one cell (the csv module's default limit is 128 KiB): cells up to
# this size are read. The limit is raised only while this module reads a CSV file, never for the process.
MAX_CSV_FIELD_BYTES = 16 << 20


@dataclass(frozen=True)
class Record:
    """One example: its fields plus the file and 1-based line (or row) it was read from."""

    fields: dict[str, Any]
    source: str
    line: int

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def detect_format(path: str | Path, format: str | None = None) -> str:
    """Return one of ``FORMATS`` for ``path``: ``format`` if given, else from the extension.

    A ``.txt`` file is TSV when its first non-blank line holds a tab, plain text otherwise.
    """
    path = Path(path)
    if format is not None:
        if format not in FORMATS:
            raise DataError(path, None, None, f"unknown format '{format}'; expected one of {', '.join(FORMATS)}")
        return format
    if path.is_dir():
        return "dataset"
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(path, None, None, f"unknown file extension '{path.suffix}'; use one of "
                        f"{', '.join(sorted(EXTENSIONS))} or pass format= ({', '.join(FORMATS)})")
    if fmt == "txt":
        first = next((ln for ln in _Source(path).lines if ln.strip()), "")
        fmt = "tsv" if "\t" in first else "text"
    return fmt


def read_records(
    path: str | Path,
    *,
    format: str | None = None,
    columns: list[str] | None = None,
    required: list[str] | None = None,
    field_types: dict[str, Any] | None = None,
    header: bool | None = None,
) -> list[Record]:
    """Read every record of ``path`` and check ``required`` fields and ``field_types``.

    ``columns`` names the columns of a CSV/TSV file without a header row (or the one field of a plain
    text file, default ``text``). ``header`` says whether a CSV/TSV file starts with a header row; by
    default it does unless ``columns`` is given, and a ``.txt`` TSV has none (columns ``col1..colN``).
    ``field_types`` maps a field to a type, a tuple of types or a union such as ``int | str``; values of
    CSV/TSV/text files are strings and are converted to ``int``/``float`` when ``str`` is not allowed.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "no such file or directory")
    fmt = detect_format(path, format)
    if columns is not None and fmt not in ("csv", "tsv", "text"):
        raise DataError(path, None, None, f"columns= names the columns of a csv, tsv or text file, not {fmt}")
    if fmt in ("dataset", "parquet"):
        records = _read_dataset(path) if fmt == "dataset" else _read_parquet(path)
        if records:  # columnar files: a missing column is a file-level error, not one of a row
            _check_columns(path, None, list(records[0].fields), required or [])
    else:
        src = _Source(path)
        if fmt in ("jsonl", "json"):
            records = _parse_json(src)
        elif fmt == "conll":
            records = _parse_conll(src)
        elif fmt == "text":
            name = (columns or ["text"])[0]
            records = [Record({name: ln}, src.path, n) for n, ln in enumerate(src.lines, 1)]
        else:
            if header is None:
                header = columns is None and path.suffix.lower() != ".txt"
            records = _parse_delimited(src, fmt, columns, header, required or [])
    if not records:
        raise DataError(path, None, None, "file has no records")
    return check_fields(records, required, field_types, convert_strings=fmt in ("csv", "tsv", "text"))


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> list[Record]:
    """Pair line i of ``src_path`` with line i of ``tgt_path`` as records with fields source/target.

    ``Record.source`` and ``Record.line`` point into the source file. Empty lines are kept (cleaning
    counts and drops them) so that the alignment of the two files is never shifted.
    """
    src, tgt = _Source(Path(src_path)), _Source(Path(tgt_path))
    if len(src.lines) != len(tgt.lines):
        longer, shorter = (src, tgt) if len(src.lines) > len(tgt.lines) else (tgt, src)
        raise DataError(longer.path, len(shorter.lines) + 1, None,
                        f"line count mismatch: {len(longer.lines)} lines here but {len(shorter.lines)} in the "
                        f"aligned file {shorter.path}; lines from {len(shorter.lines) + 1} on have no partner")
    return [Record({"source": s, "target": t}, src.path, n)
            for n, (s, t) in enumerate(zip(src.lines, tgt.lines), 1)]


def check_fields(
    records: list[Record],
    required: list[str] | None = None,
    field_types: dict[str, Any] | None = None,
    *,
    convert_strings: bool = False,
) -> list[Record]:
    """Raise a ``DataError`` at the first record lacking a ``required`` field or with a wrongly typed value.

    With ``convert_strings`` (text formats) a string is converted to ``int`` or ``float`` when the field's
    types do not allow ``str``; the returned records hold the converted values.
    """
    wanted = {name: _as_types(t) for name, t in (field_types or {}).items()}
    out = []
    for rec in records:
        for name in required or []:
            if name not in rec.fields:
                raise DataError(rec.source, rec.line, name, missing_reason(name, rec.fields))
        fields = rec.fields
        for name, allowed in wanted.items():
            if name not in fields:
                continue
            value = _typed(rec, name, fields[name], allowed, convert_strings)
            if value is not fields[name]:
                fields = {**fields, name: value}
        out.append(rec if fields is rec.fields else Record(fields, rec.source, rec.line))
    return out


def missing_reason(name: str, available: Any) -> str:
    """'missing required field' plus the closest existing name (difflib) or the list of names."""
    names = [str(a) for a in available]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return f"missing required field (did you mean '{close[0]}'?)"
    return f"missing required field (found: {', '.join(names[:12]) or 'no fields'})"


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """Convert IOB1 tags (``I-X`` may start a chunk) to IOB2 (every chunk starts with ``B-X``).

    IOB2 input comes back unchanged, so the function is safe to apply to either scheme.
    """
    out: list[str] = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev.startswith("E-") or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def _encoding_hint(data: bytes) -> str:
    """Name the likely encoding of a file that is not UTF-8, with the conversion to run."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or data[:4096].count(b"\0") > len(data[:4096]) // 8:
        return "; the file looks like UTF-16: convert it, e.g. `iconv -f UTF-16 -t UTF-8 IN > OUT`"
    return ("; the file may be Latin-1 (ISO-8859-1) or Windows-1252: convert it, e.g. "
            "`iconv -f WINDOWS-1252 -t UTF-8 IN > OUT`")


class _Source:
    """A text file decoded as UTF-8 (BOM stripped) and split into lines, with an error helper."""

    def __init__(self, path: Path):
        self.path = str(path)
        try:
            size = path.stat().st_size
            if size > MAX_TEXT_FILE_BYTES:
                raise DataError(path, None, None, f"file is {size / 2**30:.1f} GiB, over the "
                                f"{MAX_TEXT_FILE_BYTES / 2**30:.0f} GiB read into memory; split it, or convert it "
                                "to parquet")
            data = path.read_bytes()
        except OSError as e:
            raise DataError(path, None, None, f"cannot read file: {e.strerror}") from None
        bom = 3 if data.startswith(codecs.BOM_UTF8) else 0
        data = data[bom:]
        if not data.strip():
            raise DataError(path, None, None, "file is empty" if not data else "file is empty (only whitespace)")
        try:
            self.text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            col = e.start - (data.rfind(b"\n", 0, e.start) + 1)
            raise DataError(path, line, None, f"invalid UTF-8: byte 0x{data[e.start]:02x} at byte offset {col} "
                            f"of the line (offset {e.start + bom} in the file){_encoding_hint(data)}") from None
        self.complete = self.text.endswith("\n")
        lines = self.text.split("\n")
        if self.complete:
            lines.pop()
        self.lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]

    def error(self, line: int, field: str | None, reason: str, truncatable: bool = True) -> DataError:
        """A DataError at ``line``; on an unfinished last line, say that the file looks truncated."""
        if truncatable and line == len(self.lines) and not self.complete:
            reason = f"truncated last line (no newline at end of file): {reason}"
        return DataError(self.path, line, field, reason)


def _parse_json(src: _Source) -> list[Record]:
    if src.text.lstrip().startswith("["):
        return _parse_json_array(src)
    records = []
    for n, line in enumerate(src.lines, 1):
        if not line.strip():
            continue  # blank lines between JSON lines carry no record
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = " (one JSON object per line is expected)" if n == 1 and line.strip() == "{" else ""
            raise src.error(n, None, f"invalid JSON ({e.msg}, column {e.colno}){hint}") from None
        if not isinstance(obj, dict):
            raise src.error(n, None, f"expected a JSON object, found {_json_kind(obj)}")
        records.append(Record(obj, src.path, n))
    return records


def _parse_json_array(src: _Source) -> list[Record]:
    """Walk a top-level array element by element so that each record keeps its own line number."""
    text, decoder, records = src.text, json.JSONDecoder(), []
    pos, line, counted = text.index("[") + 1, 1, 0

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        raise DataError(src.path, None, None, "file has no records (empty JSON array)")
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise src.error(e.lineno, None, f"invalid JSON ({e.msg}, column {e.colno})", False) from None
        line += text.count("\n", counted, pos)
        counted = pos
        if not isinstance(obj, dict):
            raise src.error(line, None, f"expected a JSON object as array element, found {_json_kind(obj)}", False)
        records.append(Record(obj, src.path, line))
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        at = text.count("\n", 0, min(pos, len(text))) + 1
        if pos >= len(text):
            raise src.error(min(at, len(src.lines)), None, "unterminated JSON array (missing ']')", False)
        if text[pos] != "]":
            raise src.error(at, None, "invalid JSON: expected ',' or ']' after an array element", False)
        if text[pos + 1:].strip():
            raise src.error(text.count("\n", 0, skip(pos + 1)) + 1, None, "extra data after the JSON array", False)
        return records


def _parse_delimited(src: _Source, fmt: str, columns: list[str] | None, header: bool,
                     required: list[str]) -> list[Record]:
    """CSV (quoted, csv module strict mode) or TSV (no quoting: tab splits, as in Tatoeba and CoNLL)."""
    rows = _csv_rows(src) if fmt == "csv" else _tsv_rows(src)
    names, header_line = columns, None
    if header:
        try:
            header_line, _, row = next(rows)
        except StopIteration:
            raise DataError(src.path, None, None, "file is empty") from None
        names = _header_names(src, header_line, row)
        _check_columns(src.path, header_line, names, required)
    records = []
    for start, end, row in rows:
        if names is None:  # no header and no columns: name them by position
            names = [f"col{i}" for i in range(1, len(row) + 1)]
        if header_line is None and not records:
            _check_columns(src.path, None, names, required)
        if len(row) != len(names):
            like = f"({', '.join(columns)})" if columns else "like the first row"
            like = "like the header" if header_line else like
            hint = f" (a quoted field spans lines {start}-{end}: unterminated quote?)" if end > start else ""
            raise src.error(start, None, f"expected {len(names)} columns {like}, found {len(row)}{hint}")
        records.append(Record(dict(zip(names, row)), src.path, start))
    if header and not records:
        raise DataError(src.path, None, None, "file has a header but no data rows")
    return records


def _csv_rows(src: _Source):
    """Yield (first line, last line, cells) per CSV row; quoting errors become DataErrors."""
    previous = csv.field_size_limit(MAX_CSV_FIELD_BYTES)
    try:
        yield from _csv_rows_capped(src)
    finally:
        csv.field_size_limit(previous)


def _csv_rows_capped(src: _Source):
    reader = csv.reader(io.StringIO(src.text, newline=""), strict=True)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            msg = str(e)
            if "field larger than field limit" in msg:
                msg = f"a cell is larger than {MAX_CSV_FIELD_BYTES >> 20} MiB (the CSV cell size cap)"
            elif "unexpected end of data" in msg or reader.line_num > start:
                msg = f"unterminated quote: quoted field starting at line {start} is never closed ({msg})"
            else:
                msg = f"bad quoting: {msg}"
            raise src.error(start, None, msg) from None
        if row:  # the csv module returns [] for a blank line
            yield start, reader.line_num, row


def _tsv_rows(src: _Source):
    for n, line in enumerate(src.lines, 1):
        if line:
            yield n, n, line.split("\t")


def _header_names(src: _Source, line: int, row: list[str]) -> list[str]:
    names = [c.strip() for c in row]
    for i, name in enumerate(names, 1):
        if not name:
            raise src.error(line, None, f"empty column name in header (column {i})")
        if _NUMBER.match(name):
            raise src.error(line, name, "first row looks like data, not a header (a number); "
                            "pass columns=[...] to name the columns of a headerless file")
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise src.error(line, dup, "duplicate column name in header")
    return names


def _check_columns(path: str | Path, line: int | None, names: list[str], required: list[str]) -> None:
    for name in required:
        if name not in names:
            raise DataError(path, line, name, missing_reason(name, names).replace("field", "column", 1))


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq  # deferred: pyarrow is only needed for parquet files

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and others for a damaged file
        raise DataError(path, None, None, f"unreadable parquet file: {_one_line(e)}") from None
    return [Record(row, str(path), i) for i, row in enumerate(table.to_pylist(), 1)]


def _read_dataset(path: Path) -> list[Record]:
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(path, None, None, "directory is not a dataset written by datasets.save_to_disk "
                        "(no state.json or dataset_dict.json)")
    import datasets  # deferred: importing datasets takes seconds

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, ArrowInvalid, ValueError)
        raise DataError(path, None, None, f"cannot load saved dataset: {_one_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError(path, None, None, f"saved DatasetDict holds splits {', '.join(ds)}; "
                            f"pass one split's folder, e.g. {path / next(iter(ds))}")
        ds = next(iter(ds.values()))
    return [Record(row, str(path), i) for i, row in enumerate(ds.to_list(), 1)]


def _parse_conll(src: _Source) -> list[Record]:
    """Sentences of (token, tag) lines; extra middle columns (POS, chunk) are read and ignored."""
    records: list[Record] = []
    tokens: list[str] = []
    tags: list[str] = []
    first, width = 0, 0
    for n, raw in enumerate(src.lines + [""], 1):
        if not raw.strip() or raw.startswith("-DOCSTART-"):
            if tokens:
                records.append(Record({"tokens": tokens, "tags": tags}, src.path, first))
                tokens, tags = [], []
            continue
        cols = raw.split("\t") if "\t" in raw else raw.split()
        cols[-1] = cols[-1].strip()
        if not tokens:
            first, width = n, len(cols)
            if width < 2:
                raise src.error(n, None, "expected at least 2 columns (token and tag), found 1")
        elif len(cols) != width:
            raise src.error(n, None, f"expected {width} columns like line {first} (the sentence's first line), "
                            f"found {len(cols)}")
        if not _TAG.match(cols[-1]):
            raise src.error(n, "tag", f"{_show(cols[-1])} is not a tag of the form O or B-, I-, E-, S- "
                            "followed by a type")
        tokens.append(cols[0])
        tags.append(cols[-1])
    return records


def _as_types(spec: Any) -> tuple[type, ...]:
    if isinstance(spec, types.UnionType):
        return tuple(spec.__args__)
    return tuple(spec) if isinstance(spec, tuple) else (spec,)


def _typed(rec: Record, name: str, value: Any, allowed: tuple[type, ...], convert: bool) -> Any:
    """``value`` if its type is allowed (converted from a string when ``convert``), else a DataError."""
    expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    if value is None and type(None) not in allowed:
        raise DataError(rec.source, rec.line, name, f"is null, expected {expected}")
    if isinstance(value, bool) and bool not in allowed:
        pass  # True is an int to Python but never a valid label or count in a data file
    elif isinstance(value, allowed) or (float in allowed and isinstance(value, int)):
        return value
    elif convert and isinstance(value, str):
        for t in (int, float):
            if t in allowed:
                try:
                    return t(value.strip())
                except ValueError:
                    pass
    raise DataError(rec.source, rec.line, name, f"expected {expected}, found {type(value).__name__} {_show(value)}")


def _json_kind(obj: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(obj), "a number")


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__
