"""Texts to classify, read from the command line or from a file.

Files are read as UTF-8; bytes that are not UTF-8 become U+FFFD (the replacement character), so one
bad line neither stops a run nor shifts the output against the input.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from nlprnn.errors import UserError

STDIN = "-"
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TXT_SUFFIXES = (".txt", "")
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) rejects long documents


def clean_text(text: str) -> str:
    """`text` as valid Unicode: each lone surrogate becomes U+FFFD.

    Python carries bytes of command-line arguments that are not UTF-8 as lone surrogates, and JSON
    may spell them out as escapes; tokenizers and UTF-8 output both reject them.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def clean_texts(texts: Sequence[str]) -> list[str]:
    """The texts, each made valid UTF-8 (`clean_text`); a TypeError for a lone string or a text that is not one."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings; wrap a single text in a list")
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, not {type(text).__name__}")
    return [clean_text(text) for text in texts]


def read_texts(path: str, text_column: str = "text") -> Iterator[str]:
    """Yield the texts of a file, in order.

    .txt (or no suffix, or `-` for standard input): one text per line; a blank line is an empty text.
    .csv / .tsv: a header row, then one text per row in `text_column`.
    .jsonl / .ndjson: one JSON object per line with a string (or null or nothing: empty) under `text_column`,
    which at least one line must have; blank lines are skipped.
    """
    if path == STDIN:
        # -sig: a byte-order mark, as Windows tools write one, is not text
        yield from _lines(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", errors="replace", newline="\n"))
        return
    file = Path(path)
    suffix = file.suffix.lower()
    if not file.exists():
        raise UserError(f"input file not found: {file}")
    if suffix in CSV_DELIMITERS:
        yield from _csv_texts(file, CSV_DELIMITERS[suffix], text_column)
    elif suffix in JSONL_SUFFIXES:
        yield from _jsonl_texts(file, text_column)
    elif suffix in TXT_SUFFIXES:
        with _open(file, newline="\n") as f:  # only \n ends a line; a stray \r stays inside its text
            yield from _lines(f)
    else:
        raise UserError(f"cannot read {file}: use a .txt (one text per line), .csv, .tsv or .jsonl file")


def _open(file: Path, newline: str = "") -> io.TextIOWrapper:
    try:
        return open(file, encoding="utf-8-sig", errors="replace", newline=newline)
    except OSError as err:
        raise UserError(f"cannot read {file}: {err.strerror}") from None


def _lines(f: io.TextIOBase) -> Iterator[str]:
    for line in f:
        yield line.rstrip("\r\n")


def _csv_texts(file: Path, delimiter: str, column: str) -> Iterator[str]:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with _open(file) as f:
        # TSV has no quoting, as fit reads it: a quote is part of the text
        reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        try:
            if reader.fieldnames is None:
                return  # an empty file holds no texts
            if column not in reader.fieldnames:
                raise UserError(
                    f"{file} has no column {column!r} (it has {', '.join(map(repr, reader.fieldnames))}); "
                    "name the text column with --text_column"
                )
            width = len(reader.fieldnames)
            for row in reader:
                if None in row or None in row.values():  # more fields than the header, or fewer
                    fields = width + len(row.get(None, ())) if None in row else sum(v is not None for v in row.values())
                    hint = "a text cannot hold a tab" if delimiter == "\t" else "quote a text that holds a comma"
                    raise UserError(f"line {reader.line_num} of {file} has {fields} fields, not {width} ({hint}); "
                                    "--output skips and counts such rows")
                yield row[column] or ""
        except csv.Error as err:
            raise UserError(f"line {reader.line_num} of {file} is not valid CSV: {err}") from None


def _jsonl_texts(file: Path, column: str) -> Iterator[str]:
    """The texts of JSON lines; a line without the text field is an empty text, as a null one is (and as --output
    reads it), unless no line has the field: then the field is misnamed, which is one line."""
    missing = 0  # lines without the field, not yet given: until a line has it, the field may be misnamed
    fields: dict[str, None] = {}  # of those lines, for the message
    found = False
    with _open(file) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise UserError(f"line {number} of {file} is not a JSON object")
            if column not in record:
                if found:
                    yield ""
                else:
                    missing += 1
                    fields.update(dict.fromkeys(record))
                continue
            if not found:
                found = True
                yield from itertools.repeat("", missing)
            text = record[column]
            if text is not None and not isinstance(text, str):
                raise UserError(f"line {number} of {file}: {column!r} holds {type(text).__name__}, not text")
            yield clean_text(text or "")
    if missing and not found:
        raise no_text_field(file, column, list(fields))


def no_text_field(file: str | Path, column: str, fields: list[str]) -> UserError:
    """The error for JSON lines none of which has the text field."""
    return UserError(f"no line of {file} has a field {column!r} (its lines have {', '.join(map(repr, fields))}); "
                     "name the text field with --text_column")
