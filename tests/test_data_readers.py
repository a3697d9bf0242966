"""Readers and the file check: small files written here, then the real datasets under shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ppolm.data import check_file, detect_format, iob1_to_iob2, read_parallel, read_records
from ppolm.errors import DataError

SHARED = Path(os.environ.get("PPOLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data folder {SHARED} is absent")


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def test_jsonl_keeps_line_numbers_across_blank_lines_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": 0}\r\n\r\n{"text": "b", "label": 1}\r\n')
    records = read_records(path, required=["text", "label"], field_types={"label": int | str})
    assert [(r.line, r["text"], r["label"]) for r in records] == [(1, "a", 0), (3, "b", 1)]
    assert records[0].source == str(path)


def test_json_array_gives_each_element_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.json", '[\n  {"text": "a"},\n\n  {"text": "b",\n   "label": 2}\n]')
    assert [(r.line, r.fields) for r in read_records(path)] == [(2, {"text": "a"}), (4, {"text": "b", "label": 2})]


def test_csv_header_quotes_and_multiline_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", 'text,label\n"say ""hi""",1\n"two\nlines",0\nplain,1\n')
    records = read_records(path, field_types={"label": int})
    assert [r.line for r in records] == [2, 3, 5]  # a record's line is where it starts
    assert records[0].fields == {"text": 'say "hi"', "label": 1}  # converted because str is not allowed
    assert records[1]["text"] == "two\nlines"


def test_headerless_csv_with_columns_and_tsv_text(tmp_path: Path) -> None:
    ag = _write(tmp_path / "ag.csv", '"3","Title","A \\ backslash"\n"1","T2","D2"\n')
    records = read_records(ag, columns=["class", "title", "description"])
    assert records[0].fields == {"class": "3", "title": "Title", "description": "A \\ backslash"}
    tsv = _write(tmp_path / "a.tsv", 'en\tzh\n"Hi," he said.\t“你好”\n')
    assert read_records(tsv)[0].fields == {"en": '"Hi," he said.', "zh": "“你好”"}  # TSV never quotes
    pairs = _write(tmp_path / "pairs.txt", "Hi.\t嗨。\tCC\nRun.\t跑。\tCC\n")
    assert detect_format(pairs) == "tsv"
    assert read_records(pairs)[1].fields == {"col1": "Run.", "col2": "跑。", "col3": "CC"}
    text = _write(tmp_path / "lines.txt", "one\n\nthree\n")
    assert detect_format(text) == "text"
    assert [(r.line, r["text"]) for r in read_records(text)] == [(1, "one"), (2, ""), (3, "three")]


def test_parquet_and_saved_dataset(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "a.parquet")
    records = read_records(tmp_path / "a.parquet", required=["text"], field_types={"label": int})
    assert [(r.line, r.fields) for r in records] == [(1, {"text": "a", "label": 0}), (2, {"text": "b", "label": 1})]
    ds = datasets.Dataset.from_dict({"prompt": ["x", "y", "z"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert [r["prompt"] for r in read_records(tmp_path / "ds")] == ["x", "y", "z"]
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd1"))
    assert len(read_records(tmp_path / "dd1")) == 3  # a single split is read directly
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd2"))
    with pytest.raises(DataError, match="splits train, test"):
        read_records(tmp_path / "dd2")


def test_conll_multicolumn_docstart_and_iob1(tmp_path: Path) -> None:
    text = ("-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\nGerman JJ I-NP I-MISC\n\n"
            "Peter NNP I-NP I-PER\nBlackburn NNP I-NP I-PER\n")
    records = read_records(_write(tmp_path / "c.iob", text))
    assert [(r.line, r["tokens"]) for r in records] == [(3, ["EU", "rejects", "German"]), (7, ["Peter", "Blackburn"])]
    assert records[0]["tags"] == ["I-ORG", "O", "I-MISC"]  # IOB1 is read as is
    report = check_file(tmp_path / "c.iob", task="ner")
    assert report.label_counts == {"MISC": 1, "ORG": 1, "PER": 1}
    assert any("IOB1" in note for note in report.notes)


def test_iob1_to_iob2_hand_examples() -> None:
    assert iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG"]
    iob2 = ["B-PER", "I-PER", "O", "B-LOC"]
    assert iob1_to_iob2(iob2) == iob2


def test_read_parallel_pairs_lines(tmp_path: Path) -> None:
    src, tgt = _write(tmp_path / "v.en", "one\n\nthree\n"), _write(tmp_path / "v.de", "eins\nzwei\ndrei")
    records = read_parallel(src, tgt)
    assert [(r.line, r["source"], r["target"]) for r in records] == [(1, "one", "eins"), (2, "", "zwei"),
                                                                      (3, "three", "drei")]
    report = check_file(src)  # task guessed from the language suffix; the empty source line is counted
    assert report.task == "translation" and report.rows_kept == 2 and report.dropped["empty"] == 1


def test_check_file_with_tokenizer_reports_token_percentiles(tmp_path: Path) -> None:
    class SpaceTokenizer:
        def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
            return {"input_ids": [t.split() for t in texts]}

    path = _write(tmp_path / "p.jsonl", "".join(f'{{"prompt": "{"w " * n}"}}\n' for n in range(1, 21)))
    report = check_file(path, task="generation", tokenizer=SpaceTokenizer())
    assert report.char_lengths["prompt"] == {"p5": 1, "p50": 19, "p95": 37, "max": 39}
    assert report.token_lengths == {"prompt": {"p5": 1, "p50": 10, "p95": 19, "max": 20}}
    text = report.format()
    assert "rows:      read 20, kept 20, dropped 0" in text and "tokens:" in text


@needs_shared
def test_real_classification_files() -> None:
    ag = read_records(SHARED / "classification/ag_news/test.csv", columns=["class", "title", "description"],
                      field_types={"class": int})
    assert len(ag) == 7600 and {r["class"] for r in ag} == {1, 2, 3, 4}
    report = check_file(SHARED / "classification/ag_news/test.csv", task="classification")
    assert report.label_counts == {"1": 1900, "2": 1900, "3": 1900, "4": 1900}
    assert report.text_fields == ["title", "text"] and report.rows_read == 7600
    imdb = check_file(SHARED / "classification/imdb/test_first500perclass.jsonl", task="classification")
    assert imdb.label_counts == {"0": 500, "1": 500} and imdb.fields == ["id", "label", "rating", "text"]
    assert "labels:    label: 2 values: 0=500, 1=500" in imdb.format()


@needs_shared
def test_real_ner_files() -> None:
    for name, sentences, tokens in (("emerging.dev.conll", 1009, 15733), ("emerging.test.annotated", 1287, 23394)):
        records = read_records(SHARED / "ner/wnut17" / name, format="conll")
        assert len(records) == sentences and sum(len(r["tokens"]) for r in records) == tokens
        report = check_file(SHARED / "ner/wnut17" / name, task="ner")
        assert set(report.label_counts) == {"person", "location", "corporation", "product", "creative-work", "group"}
        assert report.rows_kept + report.dropped["duplicate"] == sentences


@needs_shared
def test_real_translation_files() -> None:
    report = check_file(SHARED / "translation/multi30k/val.en", task="translation")
    assert report.rows_read == 1014 and report.notes == [f"target file: {SHARED / 'translation/multi30k/val.de'}"]
    pairs = read_parallel(SHARED / "translation/multi30k/val.en", SHARED / "translation/multi30k/val.de")
    assert pairs[0].fields == {"source": "A group of men are loading cotton onto a truck",
                               "target": "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"}
    tatoeba = check_file(SHARED / "translation/tatoeba_cmn_eng/cmn.txt", task="translation")
    assert tatoeba.rows_read == 26388 and tatoeba.fields == ["source", "target", "col3"]
    assert tatoeba.char_lengths["target"]["p50"] < tatoeba.char_lengths["source"]["p50"]


@needs_shared
def test_real_generation_prompts() -> None:
    report = check_file(SHARED / "generation/imdb_prompts/train_first500perclass.jsonl", task="generation")
    assert report.text_fields == ["text"] and report.rows_read == 1000
    assert report.rows_kept + sum(report.dropped.values()) == 1000
