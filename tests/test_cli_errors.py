"""`ppolm data check` on every malformed file of tests/bad_inputs.py: exit code 2, exactly one line on stderr
naming the file and the line, no traceback; with --debug the traceback is shown.

Every file runs through `ppolm.cli.main` in-process (stderr captured at the file-descriptor level); a few also
run as real `ppolm` processes, which is where the exit code and the traceback are the interpreter's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_inputs import write_bad_corpus

from ppolm.cli import main
from ppolm.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
# the console script next to this interpreter, else the module (same main())
_SCRIPT = Path(sys.executable).parent / "ppolm"
PPOLM = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ppolm.cli"]
# read_records checks that the CLI cannot ask for (an int-only label column): no `data check` flag expresses it.
NOT_EXPRESSIBLE = {"csv_label_not_int.csv"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict]]:
    return write_bad_corpus(tmp_path_factory.mktemp("bad"))


def _argv(path: Path, expected: dict) -> list[str]:
    """The `ppolm data check` command that asks for what the corpus entry's reader call asks for."""
    kwargs = expected["kwargs"]
    argv = ["data", "check", str(path)]
    if expected["call"] == "check":
        argv += ["--task", kwargs["task"]]
    elif expected["call"] == "parallel":
        argv += ["--target", str(kwargs["tgt_path"])]
    elif "required" in kwargs or "field_types" in kwargs:
        argv += ["--task", "classification"]  # requires text + label, label int or str
    if "columns" in kwargs:
        argv += ["--columns", ",".join(kwargs["columns"])]
    if expected["call"] == "read" and not kwargs and path.suffix == ".csv":
        # without --format, a headerless CSV with an integer first column is taken as AG-News-style
        # classification data; the explicit format asks for the plain read the corpus entry describes
        argv += ["--format", "csv"]
    return argv


def _problems(rc: int, err: str, expected: dict) -> list[str]:
    lines = err.strip().splitlines()
    where = f"{expected['name']}:{expected['line']}:" if expected["line"] is not None else f"{expected['name']}: "
    problems = []
    if rc != 2:
        problems.append(f"exit code {rc}")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"stderr is not one 'error: ' line: {err[-600:]!r}")
    if "Traceback" in err:
        problems.append("traceback without --debug")
    if where not in err:
        problems.append(f"does not name {where!r}: {err.strip()[:300]!r}")
    reworded = expected["call"] == "read" and {"required", "field_types"} & set(expected["kwargs"])
    if not reworded and expected["keyword"].lower() not in err.lower():
        problems.append(f"no {expected['keyword']!r}")
    return problems


def test_every_bad_file_one_line_exit_2(corpus, capfd) -> None:
    names = {p.name for p, _ in corpus}
    assert NOT_EXPRESSIBLE <= names and len(names - NOT_EXPRESSIBLE) >= 50
    failures = []
    for path, expected in corpus:
        if path.name in NOT_EXPRESSIBLE:
            continue
        try:
            rc = main(_argv(path, expected))
        except BaseException as exc:  # noqa: BLE001 - anything escaping main() is a traceback for the user
            rc = f"{type(exc).__name__}: {exc}"
        out, err = capfd.readouterr()
        failures += [f"{path.name}: {p}" for p in _problems(rc, err, expected)]
        if out.strip():
            failures.append(f"{path.name}: printed a report although the file is bad")
    assert failures == []


def test_debug_raises_the_data_error(corpus, capfd) -> None:
    """--debug re-raises instead of printing one line (the interpreter then prints the traceback)."""
    for path, expected in corpus:
        if path.name in NOT_EXPRESSIBLE:
            continue
        with pytest.raises(DataError) as info:
            main(["--debug", *_argv(path, expected)])
        assert expected["name"] in str(info.value), path.name
    capfd.readouterr()


def test_real_processes_exit_2_and_debug_shows_traceback(corpus) -> None:
    """`ppolm data check` as a console script: three bad files, and one again with --debug (in parallel)."""
    picked = {"json_bad_syntax.jsonl": 3, "csv_too_few.csv": 4, "conll_bad_tag.conll": 3}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    for path, expected in corpus:
        if path.name in picked:
            runs.append((path, expected, False))
    runs.append((*next((p, e) for p, e in corpus if p.name == "json_bad_syntax.jsonl"), True))
    procs = [(path, expected, debug, subprocess.Popen(
        [*PPOLM, *(["--debug"] if debug else []), *_argv(path, expected)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for path, expected, debug in runs]
    for path, expected, debug, proc in procs:
        out, err = proc.communicate(timeout=120)
        if debug:
            assert proc.returncode == 1 and "Traceback (most recent call last)" in err
            assert err.strip().splitlines()[-1].startswith("ppolm.errors.DataError: ")
            assert f"{path.name}:{expected['line']}:" in err
        else:
            assert _problems(proc.returncode, err, expected) == [], path.name
            assert out == ""


def test_label_missing_in_one_row_without_task_is_one_line(corpus, capfd) -> None:
    path = next(p for p, _ in corpus if p.name == "json_missing_required.jsonl")
    rc = main(["data", "check", str(path)])
    _, err = capfd.readouterr()
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"{path.name}:3:" in err
