"""A corpus of malformed data files, each with the DataError it must produce.

``write_bad_corpus(dir)`` writes the files and returns ``(path, expected)`` pairs where ``expected`` has:
``line`` (int or None for a file-level error), ``keyword`` (a phrase the message must contain),
``call`` ("read", "check" or "parallel"), ``kwargs`` for that call, and ``name`` (the file the message
must name; default the path's name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INT_OR_STR = {"label": int | str}


def write_bad_corpus(dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Write at least 35 distinct malformed files under ``dir``; return them with their expected errors."""
    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    cases: list[tuple[Path, dict[str, Any]]] = []

    def add(name: str, content: str | bytes | None, line: int | None, keyword: str, call: str = "read",
            **kwargs: Any) -> Path:
        path = root / name
        if isinstance(content, str):
            path.write_bytes(content.encode("utf-8"))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        shown = kwargs.pop("expect_name", name)
        cases.append((path, {"line": line, "keyword": keyword, "call": call, "kwargs": kwargs, "name": shown}))
        return path

    ok = '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n'
    # JSON lines
    add("json_bad_syntax.jsonl", ok + '{"text": "c", "label": 1,}\n', 3, "invalid JSON")
    add("json_unquoted_key.jsonl", '{"text": "a"}\n{text: "b"}\n', 2, "invalid JSON")
    add("json_array_line.jsonl", '{"text": "a"}\n[1, 2]\n', 2, "expected a JSON object, found an array")
    add("json_string_line.jsonl", ok + '\n"hello"\n', 4, "found a string")
    add("json_truncated.jsonl", ok + '{"text": "c", "lab', 3, "truncated last line")
    add("json_invalid_utf8.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', 2,
        "invalid UTF-8: byte 0xe9 at byte offset 13")
    add("json_empty.jsonl", b"", None, "file is empty")
    add("json_whitespace.jsonl", "\n  \n\t\n", None, "empty")
    add("json_missing_required.jsonl", ok + '{"text": "c"}\n', 3, "field 'label': missing required field",
        required=["text", "label"])
    add("json_misnamed.jsonl", '{"txt": "a", "label": 0}\n', 1, "did you mean 'txt'", required=["text"])
    add("json_label_float.jsonl", ok.replace('"label": 1', '"label": 0.5'), 2, "expected int or str, found float",
        field_types=INT_OR_STR)
    add("json_text_int.jsonl", ok + '{"text": 42, "label": 1}\n', 3, "field 'text': expected str",
        field_types={"text": str})
    add("json_text_null.jsonl", '{"text": null, "label": 1}\n', 1, "is null", field_types={"text": str})
    add("json_label_bool.jsonl", '{"text": "a", "label": true}\n', 1, "found bool", field_types=INT_OR_STR)
    # one JSON document holding an array of objects
    add("array_not_object.json", '[\n  {"text": "a"},\n  [1, 2]\n]\n', 3, "array element")
    add("array_unterminated.json", '[\n{"text": "a"},\n{"text": "b"}\n', 3, "unterminated JSON array")
    add("array_bad_element.json", '[\n{"text": "a"},\n{"text": }\n]\n', 3, "invalid JSON")
    add("array_empty.json", "[ ]\n", None, "no records")
    add("json_pretty_object.json", '{\n  "text": "a"\n}\n', 1, "one JSON object per line")
    # CSV
    add("csv_unterminated_quote.csv", 'text,label\n"good",1\n"bad,0\n"ok",1\n', 3, "unterminated quote")
    add("csv_bad_quote.csv", 'text,label\n"a"b,1\n', 2, "bad quoting")
    add("csv_too_few.csv", "text,label,id\na,1,1\nb,0,2\nc,1\n", 4, "expected 3 columns like the header, found 2")
    add("csv_too_many.csv", "text,label\na,1\nb,0,extra,more\n", 3, "found 4")
    add("csv_missing_column.csv", "text,score\na,1\n", 1, "field 'label': missing required column",
        required=["label"])
    add("csv_misnamed_column.csv", "text,lable\na,1\n", 1, "did you mean 'lable'", required=["label"])
    add("csv_label_not_int.csv", "text,label\na,1\nb,x\n", 3, "expected int, found str", field_types={"label": int})
    add("csv_truncated.csv", 'text,label\na,1\nb,"unfinished', 3, "truncated last line")
    add("csv_header_only.csv", "text,label\n", None, "no data rows")
    add("csv_numeric_header.csv", "1,hello\n2,world\n", 1, "not a header")
    add("csv_duplicate_header.csv", "text,label,text\na,1,b\n", 1, "duplicate column name")
    add("csv_empty_header.csv", "text,,label\na,b,1\n", 1, "empty column name")
    add("csv_columns_mismatch.csv", '"1","title"\n', 1, "expected 3 columns (label, title, text), found 2",
        columns=["label", "title", "text"])
    add("csv_invalid_utf8.csv", b"text,label\na,1\n\xff\xfeb,0\n", 3, "invalid UTF-8")
    # TSV and plain text
    add("tsv_ragged.tsv", "a\tb\n1\t2\n3\n", 3, "expected 2 columns")
    add("tsv_invalid_utf8.txt", b"hi\tni hao\nbye\t\xe5\x86\n", 2, "invalid UTF-8")
    add("text_invalid_utf8.txt", b"one\ntwo\nthr\xc3\n", 3, "byte offset 3")
    # CoNLL
    add("conll_ragged.conll", "EU\tB-ORG\nrejects\tO\n\nPeter\tB-PER\nBlackburn\tNNP\tI-PER\n", 5,
        "expected 2 columns like line 4")
    add("conll_bad_tag.conll", "EU\tB-ORG\nrejects\tO\nGerman\tX-MISC\n", 3, "field 'tag'")
    add("conll_lowercase_tag.conll", "\n\nPeter\tb-per\n", 3, "is not a tag")
    add("conll_empty_type.conll", "Peter\tB-\n", 1, "is not a tag")
    add("conll_missing_tag.conll", "EU\tB-ORG\n\nrejects\n", 3, "at least 2 columns")
    add("conll_truncated.conll", "EU\tB-ORG\nrejects\tO\nGerm", 3, "truncated last line")
    add("conll_invalid_utf8.conll", b"EU\tB-ORG\nr\xc3\x28jects\tO\n", 2, "invalid UTF-8")
    add("conll_docstart_only.conll", "-DOCSTART- -X- O O\n\n", None, "no records")
    add("conll_spaces_ragged.iob", "EU NNP B-ORG\nrejects VBZ\n", 2, "expected 3 columns")
    # parallel text
    add("par_mismatch.de", "eins\nzwei\n", None, "")
    cases.pop()  # the .de side is only a partner file
    add("par_mismatch.en", "one\ntwo\nthree\n", 3, "line count mismatch", call="parallel",
        tgt_path=root / "par_mismatch.de")
    add("par_short.de", "eins\nzwei\ndrei\nvier\n", None, "")
    cases.pop()
    add("par_short.en", "one\ntwo\n", 3, "par_short.en", call="parallel", tgt_path=root / "par_short.de",
        expect_name="par_short.de")
    add("par_bad_utf8.de", b"eins\nzw\xffei\n", None, "")
    cases.pop()
    add("par_bad_utf8.en", "one\ntwo\n", 2, "invalid UTF-8", call="parallel", tgt_path=root / "par_bad_utf8.de",
        expect_name="par_bad_utf8.de")
    add("par_empty.de", "eins\n", None, "")
    cases.pop()
    add("par_empty.en", b"", None, "file is empty", call="parallel", tgt_path=root / "par_empty.de")
    # columnar files, folders, names
    add("bad.parquet", b"PAR1 this is not a parquet file", None, "unreadable parquet")
    _write_parquet(root / "misnamed.parquet", {"txt": ["a"], "label": [0]})
    add("misnamed.parquet", None, None, "did you mean 'txt'", required=["text"])
    (root / "not_a_dataset").mkdir(exist_ok=True)
    (root / "not_a_dataset" / "notes.txt").write_text("hello\n")
    add("not_a_dataset", None, None, "save_to_disk")
    add("data.xyz", "text\n", None, "unknown file extension '.xyz'")
    add("no_such_file.jsonl", None, None, "no such file")
    # check_file: task-level requirements
    add("chk_label_misnamed.jsonl", '{"text": "good", "lbl": 1}\n', 1, "did you mean 'lbl'", call="check",
        task="classification")
    add("chk_label_list.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": [1]}\n', 2,
        "expected int or str, found list", call="check", task="classification")
    add("chk_all_empty.jsonl", '{"text": "", "label": 0}\n{"text": "  \\n ", "label": 1}\n', None,
        "all 2 rows were filtered out (empty=2", call="check", task="classification")
    add("chk_no_sibling.en", "one\n", None, "no target file", call="check", task="translation")
    add("chk_prompt_misnamed.jsonl", '{"promt": "Once upon"}\n', 1, "did you mean 'promt'", call="check",
        task="generation")
    add("chk_ner_ragged.annotated", "a\tO\nb\tO\tO\n", 2, "expected 2 columns", call="check", task="ner")
    add("chk_ag_ragged.csv", '"3","Title","Text"\n"4","Title only"\n', 2, "expected 3 columns (label, title, text)",
        call="check", task="classification")
    add("chk_pairs_one_column.tsv", "hello\nworld\n", 1, "expected 2 columns (source, target)", call="check",
        task="translation")
    add("chk_csv_no_text.csv", "label,body\n1,hello\n", 1, "field 'text': missing required field", call="check",
        task="classification")
    return cases


def _write_parquet(path: Path, columns: dict[str, list[Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
