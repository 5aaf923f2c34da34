"""Reading texts to classify: .txt, .csv/.tsv, .jsonl; undecodable bytes replaced; clear errors."""

from __future__ import annotations

import json

import pytest

from nlprnn.deploy.inputs import clean_text, read_texts
from nlprnn.errors import UserError


def test_txt_is_one_text_per_line_blank_lines_included(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_bytes("\ufefffirst one\r\n\nthird\rstill third\nlast without newline".encode())
    assert list(read_texts(str(path))) == ["first one", "", "third\rstill third", "last without newline"]


def test_undecodable_bytes_become_replacement_characters(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_bytes(b"caf\xe9 ok\n\xff\xfe\nfine\n")
    assert list(read_texts(str(path))) == ["caf\ufffd ok", "\ufffd\ufffd", "fine"]


def test_csv_and_tsv_read_the_text_column(tmp_path):
    csv_file = tmp_path / "in.csv"
    csv_file.write_bytes(b'id,body\n1,"multi\nline, quoted"\n2,\n3,caf\xe9\n')
    assert list(read_texts(str(csv_file), "body")) == ["multi\nline, quoted", "", "caf\ufffd"]
    tsv_file = tmp_path / "in.TSV"
    tsv_file.write_text("text\tlabel\nhello there\tx\n")
    assert list(read_texts(str(tsv_file))) == ["hello there"]
    tsv_file.write_text('text\tlabel\n"Great film\tpos\nhe said "ok" twice\tneg\n')  # TSV quotes are text
    assert list(read_texts(str(tsv_file))) == ['"Great film', 'he said "ok" twice']


def test_csv_reads_documents_longer_than_the_csv_module_default(tmp_path):
    path = tmp_path / "long.csv"
    long_text = "word " * 40_000  # 200 000 characters, above the csv module's 131 072
    path.write_text(f"text\n{long_text}\n")
    assert list(read_texts(str(path))) == [long_text]


def test_csv_without_the_column_names_the_columns(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("body,label\nhi,x\n")
    with pytest.raises(UserError, match=r"no column 'text' \(it has 'body', 'label'\).*--text_column"):
        list(read_texts(str(path)))


@pytest.mark.parametrize("suffix, row, fields", [(".csv", "1,hello, world", 3), (".csv", "1", 1), (".tsv", "1\ta\tb", 3)])
def test_a_row_with_another_number_of_fields_is_one_line_not_a_shifted_text(tmp_path, suffix, row, fields):
    path = tmp_path / f"in{suffix}"
    sep = "," if suffix == ".csv" else "\t"
    path.write_text(f"id{sep}text\n0{sep}fine\n{row}\n")
    hint = "quote a text that holds a comma" if suffix == ".csv" else "a text cannot hold a tab"
    with pytest.raises(UserError, match=f"^line 3 of .*in{suffix} has {fields} fields, not 2 \\({hint}\\)"):
        list(read_texts(str(path)))


def test_empty_csv_holds_no_texts(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert list(read_texts(str(path))) == []


def test_jsonl(tmp_path):
    path = tmp_path / "in.jsonl"
    records = [{"review": "good"}, {"review": None}, {"review": "bad \ud800 surrogate"}]
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]) + "\n")
    assert list(read_texts(str(path), "review")) == ["good", "", "bad \ufffd surrogate"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{oops", "line 2 of .* is not a JSON object"),
        ('["text"]', "line 2 of .* is not a JSON object"),
        ('{"text": 3}', "line 2 of .*'text' holds int, not text"),
    ],
)
def test_bad_jsonl_lines(tmp_path, line, message):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        list(read_texts(str(path)))


def test_a_jsonl_line_without_the_text_field_is_an_empty_text_unless_no_line_has_it(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1}\n{"id": 2, "text": "good"}\n{"id": 3}\n')
    assert list(read_texts(str(path))) == ["", "good", ""]  # as --output reads them: null texts
    path.write_text('{"id": 1, "body": "good"}\n\n{"id": 2}\n')
    with pytest.raises(UserError, match=r"^no line of .*in\.jsonl has a field 'text' \(its lines have 'id', 'body'\); "
                                        "name the text field with --text_column$"):
        list(read_texts(str(path)))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="input file not found"):
        list(read_texts(str(tmp_path / "nope.txt")))
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"cannot read .*x.parquet: use a .txt.*\.csv, \.tsv or \.jsonl"):
        list(read_texts(str(tmp_path / "x.parquet")))


def test_clean_text():
    assert clean_text("plain é text") == "plain é text"
    assert clean_text("caf\udce9") == "caf\ufffd"  # a command-line byte 0xE9 that is not UTF-8
    assert clean_text("lone \ud800 surrogate") == "lone \ufffd surrogate"  # e.g. from a JSON escape
    assert clean_text("mixed \udce9 and \ud800") == "mixed \ufffd and \ufffd"
