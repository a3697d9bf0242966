"""Review debts of config, CLI, packaging and data reading (issue 15, items 17-22): each test failed before its
fix."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ppolm import cli
from ppolm.errors import ConfigError, DataError
from ppolm.tasks.base import Decoding
from ppolm.update import TrainingAborted

ROOT = Path(__file__).resolve().parents[1]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ppolm.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ---- item 17: bad values rejected before any model loads ----------------------------------------------------
def test_bad_betas_exit_2_in_one_line_before_loading(tmp_path):
    run = _cli("ppo", "configs/tiny.yaml", "optim.betas=[1.5,0.9]", f"output_dir={tmp_path}")
    assert run.returncode == 2
    assert _last_line(run.stderr) == ("error: configs/tiny.yaml: key 'optim.betas.0': Input should be less than 1 "
                                      "(got 1.5)")
    assert not any(tmp_path.iterdir())  # nothing written: refused before the run started


@pytest.mark.parametrize("kwargs", [{"temperature": float("nan")}, {"temperature": -1.0}, {"top_p": 0.0},
                                    {"top_p": float("nan")}, {"max_new_tokens": 0}])
def test_decoding_rejects_nan_and_out_of_range(kwargs):
    with pytest.raises(ConfigError):
        Decoding(**kwargs)


def test_generate_rejects_nan_temperature(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    run = _cli("generate", "--model", "tiny-random-llama", "--input", str(prompts), "--temperature", "nan")
    assert run.returncode == 2 and "--temperature" in _last_line(run.stderr)


# ---- item 18: a diverged run has its own exit code -------------------------------------------------------------
def test_training_aborted_exits_3_and_bad_input_exits_2(monkeypatch, capsys):
    def diverge(args, parser):
        raise TrainingAborted("step 3: 3 optimizer steps in a row had non-finite gradients; aborting")

    monkeypatch.setattr(cli, "dispatch", diverge)
    assert cli.main(["models"]) == 3
    assert capsys.readouterr().err.startswith("error: step 3:")
    assert ConfigError.exit_code == DataError.exit_code == 2
    readme = (ROOT / "README.md").read_text()
    assert "| 3 |" in readme and "| 2 |" in readme and "| 130 |" in readme  # the codes are documented


# ---- item 19: usage errors exit 2; eval/generate show progress ---------------------------------------------------
def test_no_subcommand_prints_usage_and_exits_2(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ppolm") and "a command is required" in err
    assert cli.main(["data"]) == 2


def test_generate_shows_a_progress_bar(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nworld\n")
    run = _cli("generate", "--model", "tiny-random-llama", "--input", str(prompts), "--max-new-tokens", "2",
               "--output", str(tmp_path / "out.jsonl"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "generate: 100%" in run.stderr and "2/2" in run.stderr


# ---- item 20: packaging ------------------------------------------------------------------------------------------------
def test_dependency_floors_are_the_tested_versions():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {Requirement(d).name: Requirement(d) for d in project["dependencies"]}
    # The tested versions: torch from the Makefile's TORCH_SPEC, the rest from constraints.txt (which `make`
    # installs with, so that a release made after the last green run cannot change what CI tests).
    tested = {"torch": re.search(r"TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, pin = line.split("==")
            tested[name.lower()] = pin
    for name in project["dependencies"]:
        assert Requirement(name).name.lower() in tested, f"{name} has no tested version in constraints.txt"
    for name in ("torch", "transformers"):
        assert deps[name].specifier.contains(tested[name]), (name, tested[name])
        floor = next(s.version for s in deps[name].specifier if s.operator == ">=")
        # the floor is the tested major.minor, not an older untested one
        assert floor.split(".")[:2] == tested[name].split(".")[:2], (name, floor, tested[name])
        # and the suite runs on the tested version (`make test` installs it)
        assert version(name).split("+")[0] == tested[name], (name, version(name), tested[name])
    assert "tensorboard" in deps  # log.tensorboard defaults to true
    extras = project["optional-dependencies"]
    assert any(d.startswith("httpx") for d in extras["test"]) and not any(d.startswith("httpx") for d in extras["serve"])


# ---- item 21: CSV cell cap scoped to the read, encodings named -------------------------------------------------
def test_csv_field_limit_is_not_raised_for_the_process(tmp_path):
    from ppolm.data.readers import MAX_CSV_FIELD_BYTES, read_records

    before = csv.field_size_limit()
    assert before < 2**31 - 1  # importing ppolm did not raise it for everyone
    big = tmp_path / "big.csv"
    big.write_text("text,label\n" + '"' + "x" * 200_000 + '",1\n')
    assert len(read_records(big)[0]["text"]) == 200_000  # larger than csv's default 128 KiB
    assert csv.field_size_limit() == before
    huge = tmp_path / "huge.csv"
    huge.write_text("text,label\n" + '"' + "x" * (MAX_CSV_FIELD_BYTES + 10) + '",1\n')
    with pytest.raises(DataError, match=r"huge.csv:2: a cell is larger than 16 MiB"):
        read_records(huge)


def test_text_files_over_the_size_cap_are_refused(tmp_path, monkeypatch):
    import ppolm.data.readers as readers

    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "hello"}\n' * 100)
    monkeypatch.setattr(readers, "MAX_TEXT_FILE_BYTES", 1000)
    with pytest.raises(DataError, match=r"a.jsonl: file is 0.0 GiB, over the"):
        readers.read_records(path)


@pytest.mark.parametrize("encoding, hint", [("utf-16", "UTF-16"), ("latin-1", "Latin-1")])
def test_non_utf8_files_name_the_likely_encoding(tmp_path, encoding, hint):
    from ppolm.data.readers import read_records

    path = tmp_path / "a.csv"
    path.write_bytes("text,label\ncafé crème,1\n".encode(encoding))
    with pytest.raises(DataError) as info:
        read_records(path)
    assert "invalid UTF-8" in str(info.value) and hint in str(info.value) and "iconv" in str(info.value)


# ---- item 22: stop words as an optional cleaning step ----------------------------------------------------------
def test_stop_words_are_off_by_default_and_removed_when_asked(tmp_path):
    from ppolm.data.clean import load_stop_words, remove_stop_words
    from ppolm.tasks import build_task

    data = tmp_path / "d.csv"
    data.write_text("text,label\nThe film is great.,positive\nIt was not good at all!,negative\n")
    plain = build_task("classification", {}).load(str(data))
    assert plain[0].prompt.endswith("Text: The film is great.")
    english = build_task("classification", {"stop_words": "english"}).load(str(data))
    assert english[0].prompt.endswith("Text: film great.") and english[1].prompt.endswith("Text: good")  # "not" is an English stop word too
    own = tmp_path / "words.txt"
    own.write_text("# my list\nfilm\nGREAT\n")
    assert remove_stop_words("The film is great.", load_stop_words(str(own))) == "The is"
    with pytest.raises(ConfigError, match="stop_words: '.*missing.txt' is neither 'english'"):
        build_task("classification", {"stop_words": str(tmp_path / "missing.txt")})
