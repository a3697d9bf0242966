"""Every malformed file of the bad corpus raises one DataError naming the file, the line and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppolm.data import check_file, read_parallel, read_records
from ppolm.errors import DataError

try:  # tests/ is on sys.path under pytest's default import mode; a package layout needs the prefix
    from bad_inputs import write_bad_corpus
except ImportError:
    from tests.bad_inputs import write_bad_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict]]:
    return write_bad_corpus(tmp_path_factory.mktemp("bad"))


def _run(path: Path, expected: dict) -> None:
    kwargs = dict(expected["kwargs"])
    if expected["call"] == "parallel":
        read_parallel(path, kwargs.pop("tgt_path"))
    elif expected["call"] == "check":
        check_file(path, **kwargs)
    else:
        read_records(path, **kwargs)


def test_corpus_is_large_and_distinct(corpus: list[tuple[Path, dict]]) -> None:
    names = [path.name for path, _ in corpus]
    assert len(names) >= 35
    assert len(set(names)) == len(names)


def test_each_bad_file_raises_one_precise_error(corpus: list[tuple[Path, dict]]) -> None:
    failures = []
    for path, expected in corpus:
        try:
            _run(path, expected)
        except DataError as err:
            msg = str(err)
            line = expected["line"]
            where = f"{expected['name']}:{line}:" if line is not None else f"{expected['name']}: "
            problems = [
                "multi-line message" if "\n" in msg else "",
                f"no '{where}'" if where not in msg else "",
                f"line attribute {err.line} != {line}" if err.line != line else "",
                f"no keyword '{expected['keyword']}'" if expected["keyword"].lower() not in msg.lower() else "",
            ]
            if any(problems):
                failures.append(f"{path.name}: {'; '.join(p for p in problems if p)} in: {msg}")
        except Exception as err:  # any other exception type is a bug: users must get a DataError
            failures.append(f"{path.name}: {type(err).__name__}: {err}")
        else:
            failures.append(f"{path.name}: no error raised")
    assert not failures, "\n".join(failures)


def test_parallel_mismatch_names_both_files(corpus: list[tuple[Path, dict]]) -> None:
    path, expected = next((p, e) for p, e in corpus if p.name == "par_mismatch.en")
    with pytest.raises(DataError) as info:
        _run(path, expected)
    assert "par_mismatch.en" in str(info.value) and "par_mismatch.de" in str(info.value)


def test_bom_is_accepted_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    assert read_records(path)[0]["text"] == "a"
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(b"\xef\xbb\xbftext,label\nhi,1\n")
    assert read_records(csv_path, required=["text"])[0].fields == {"text": "hi", "label": "1"}
