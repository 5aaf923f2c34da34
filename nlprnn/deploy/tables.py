"""Arrow tables in and out of batch scoring: read inputs in bounded batches, score a table, write a part.

Shared by the streaming scorer (`nlprnn.deploy.stream`) and the cluster path (`nlprnn.deploy.ray`), so
both give the same columns for the same rows. Needs pyarrow: `pip install "nlprnn[batch]"`.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from nlprnn.deploy.inputs import clean_text, no_text_field
from nlprnn.errors import UserError, first_line

try:
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401  (pa.compute)
    import pyarrow.csv as pa_csv
    import pyarrow.fs as pa_fs
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover - the base install has no pyarrow
    raise UserError('batch scoring with --output needs pyarrow: pip install "nlprnn[batch]"') from None

if TYPE_CHECKING:
    from nlprnn.deploy.predictor import Predictor

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "txt"}
OUTPUT_FORMATS = ("parquet", "csv", "jsonl")
LABEL_COLUMN = "predicted_label"
PROBABILITY_PREFIX = "probability_"
BATCH_ROWS = 8192  # rows per record batch read: bounded memory whatever the file size
TEXT_LINES_COLUMN = "text"  # the one column of a .txt input
COLUMNS_SAMPLE = 1000  # JSON objects whose fields `columns_of` reads
UNDECODABLE = "\0undecodable"  # marks JSON lines whose bytes were replaced; counted and dropped by score_table


def output_columns(labels: list[str]) -> list[str]:
    """The columns scoring adds: the predicted label, then one probability per label."""
    return [LABEL_COLUMN] + [PROBABILITY_PREFIX + label for label in labels]


def refuse_clashing_columns(labels: list[str], columns: list[str] | tuple[str, ...]) -> None:
    """One line, before anything is written, when an input column has a name that scoring writes."""
    if clash := set(output_columns(labels)) & set(columns):
        raise UserError(f"the input already has a column {sorted(clash)[0]!r}, which scoring writes; rename it first")


@dataclass
class Counts:
    """What happened to the rows of a part (or of a whole job)."""

    rows: int = 0
    scored: int = 0
    empty: int = 0  # null, empty or whitespace-only text: written without a label
    undecodable: int = 0  # bytes that are not UTF-8, replaced by U+FFFD, then scored

    def add(self, other: Counts) -> None:
        self.rows += other.rows
        self.scored += other.scored
        self.empty += other.empty
        self.undecodable += other.undecodable


@dataclass(frozen=True)
class InputFiles:
    """The files of an input (one file, or a folder of parts read in name order), all of one format."""

    files: tuple[Path, ...]
    format: str
    text_column: str
    columns: tuple[str, ...]  # of the first file (of every line of every file, for JSON lines)
    schema: pa.Schema | None = None  # JSON lines, Parquet: of every file, which each batch is given

    def batches(self, on_malformed: Callable[[str], None] | None = None) -> Iterator[pa.RecordBatch]:
        """Every row of every file in order, in record batches of at most BATCH_ROWS rows.

        The text column comes as strings or bytes (decoded by `decode_texts`); other columns of CSV/TSV
        inputs as strings, so that ids such as 007 keep their zeros. A CSV row with the wrong number of
        fields or a JSON line that is not an object is skipped and passed to `on_malformed`.
        """
        for file in self.files:
            if self.format == "parquet":
                yield from (_conform(batch, self.schema) for batch in _parquet_batches(file))
            elif self.format in ("csv", "tsv"):
                yield from _csv_batches(file, self.format, self.text_column, on_malformed)
            elif self.format == "jsonl":
                yield from jsonl_batches(_binary_lines(file), file, self.text_column, on_malformed, self.schema)
            else:
                yield from _line_batches(file)

    def approximate_rows(self) -> int:
        """The number of rows, exact for Parquet, else counted as lines (fast; quoted newlines overcount)."""
        if self.format == "parquet":
            return sum(pq.ParquetFile(file).metadata.num_rows for file in self.files)
        header = 1 if self.format in ("csv", "tsv") else 0
        return sum(max(_count_lines(file) - header, 0) for file in self.files)


def open_input(path: str | Path, text_column: str) -> InputFiles:
    """The input at `path`, checked: a readable format, the same columns in every file, a text column."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"input not found: {root}")
    if root.is_dir():
        files = sorted(f for f in root.iterdir() if f.is_file() and not f.name.startswith(("_", ".")))
        formats = {FORMATS.get(f.suffix.lower()) for f in files}
        if not files:
            raise UserError(f"{root} holds no files to score")
        if len(formats) != 1 or None in formats:
            raise UserError(f"{root} mixes formats or holds files that are not {_readable()}; give one file instead")
    else:
        files = [root]
        if root.suffix.lower() not in FORMATS:
            raise UserError(f"cannot read {root}: use {_readable()}, or a folder of them")
    fmt = FORMATS[files[0].suffix.lower()]
    if fmt == "txt":
        text_column = TEXT_LINES_COLUMN
    if fmt == "jsonl":
        schema = jsonl_schema(files, text_column)
        return InputFiles(tuple(files), fmt, text_column, tuple(schema.names[:-1]), schema)  # less UNDECODABLE
    first_columns = columns_of(files[0], fmt)
    for file in files[1:]:
        if (columns := columns_of(file, fmt)) != first_columns:
            raise UserError(f"{file} has columns {columns} but {files[0]} has {first_columns}; parts must agree")
    if text_column not in first_columns:
        raise UserError(
            f"{files[0]} has no column {text_column!r} (it has {', '.join(map(repr, first_columns))}); "
            "name the text column with --text_column"
        )
    schema = parquet_schema(files, text_column) if fmt == "parquet" else None
    return InputFiles(tuple(files), fmt, text_column, tuple(first_columns), schema)


def parquet_schema(
    files: Sequence[str | Path], text_column: str, filesystem: pa_fs.FileSystem | None = None
) -> pa.Schema:
    """The columns of Parquet `files` with one type each, joined over every file (null joins any type, an int a
    float), so that every part gets the same types; a column whose types cannot be joined, or a text column that
    is missing or holds no text, is one line before anything is written. A text column whose type differs
    between files is bytes, decoded by `decode_texts` as any text is. `filesystem` reads remote files."""
    merged, text_types = None, set()
    for file in files:
        try:
            schema = pq.read_schema(str(file), filesystem=filesystem)
        except (OSError, pa.ArrowException) as err:
            raise UserError(f"cannot read {file}: {first_line(err)}") from None
        if text_column not in schema.names:  # the first file's columns were checked; a folder's others may differ
            raise UserError(f"{file} has no column {text_column!r}; every file needs it")
        if not _holds_text(kind := schema.field(text_column).type):
            raise UserError(f"column {text_column!r} of {file} holds {kind}, not text; name the text column "
                            "with --text_column")
        text_types.add(kind)
        others = schema.remove(schema.get_field_index(text_column))
        try:
            merged = others if merged is None else _unified(merged, others)
        except (pa.ArrowException, TypeError, ValueError) as err:
            raise UserError(f"cannot read {file}: its column types do not join those of the files before it "
                            f"({first_line(err)}); give every file the same types") from None
    text_type = text_types.pop() if len(text_types) == 1 else pa.large_binary()
    return merged.insert(schema.get_field_index(text_column), pa.field(text_column, text_type))


def jsonl_schema(files: list[Path], text_column: str) -> pa.Schema:
    """The columns and types of every JSON line of `files`, found in one pass before any row is scored (as Spark
    does), so that every part gets the same columns and types, and a field whose types cannot be joined, or a
    file none of whose lines has the text field, is one line before anything is written. Its last column is
    UNDECODABLE."""
    schema = None
    for file in files:
        own = None  # this file's alone: each file must name the text field somewhere
        for batch in jsonl_batches(_binary_lines(file), file, text_column, on_malformed=None):
            own = batch.schema
        if own is None:  # blank, or only lines that are skipped as malformed
            continue
        if text_column not in own.names:
            raise no_text_field(file, text_column, [name for name in own.names if name != UNDECODABLE])
        try:
            schema = own if schema is None else _unified(schema, own)
        except (pa.ArrowException, TypeError, ValueError) as err:
            raise _type_changes(file, err) from None
    if schema is None:  # nothing to score
        return pa.schema([(text_column, pa.string()), (UNDECODABLE, pa.bool_())])
    return schema.remove(schema.get_field_index(UNDECODABLE)).append(schema.field(UNDECODABLE))


def refuse_unwritable(schema: pa.Schema | None, file: str | Path, output_format: str) -> None:
    """One line, before anything is written, when a column of the input's `schema` (that of `file` and the files
    after it) is nested (a JSON object or list, a Parquet struct or list) and the output is CSV, which holds flat
    values only."""
    if output_format != "csv" or schema is None:
        return
    for field in schema:
        if pa.types.is_nested(field.type):
            raise UserError(f"column {field.name!r} of {file} holds {field.type}, which CSV cannot hold; "
                            "write Parquet or JSON lines (--output_format)")


def decode_texts(column: pa.Array | pa.ChunkedArray) -> tuple[list[str | None], int]:
    """A text column as Python strings (None where null) and how many held bytes that are not UTF-8.

    Such bytes become U+FFFD, as in `predict` on the command line; one bad text never stops a job.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not _holds_text(column.type):
        raise UserError(f"the text column holds {column.type}, not text")
    if pa.types.is_null(column.type):
        return [None] * len(column), 0
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.to_pylist(), 0
    try:
        return column.cast(pa.large_string()).to_pylist(), 0  # validates UTF-8 in one pass
    except pa.ArrowInvalid:
        texts: list[str | None] = []
        undecodable = 0
        for value in column.to_pylist():
            if value is None:
                texts.append(None)
                continue
            try:
                texts.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                texts.append(value.decode("utf-8", errors="replace"))
                undecodable += 1
        return texts, undecodable


def _holds_text(kind: pa.DataType) -> bool:
    """Strings, bytes to decode, either dictionary-encoded (pandas' categoricals), or nothing at all (nulls)."""
    types = pa.types
    if types.is_dictionary(kind):
        return _holds_text(kind.value_type)
    return any(is_(kind) for is_ in (types.is_string, types.is_large_string, types.is_string_view, types.is_binary,
                                     types.is_large_binary, types.is_binary_view, types.is_null))


def score_table(
    predictor: Predictor, table: pa.Table, text_column: str, slice_rows: int = 16384
) -> tuple[pa.Table, Counts]:
    """`table` with its text column as strings, the predicted label and each label's probability added.

    Rows whose text is null, empty or whitespace get no label and null probabilities (counted as empty).
    Texts are scored `slice_rows` at a time, each slice sorted by length inside the Predictor.
    """
    undecodable = 0
    if UNDECODABLE in table.column_names:  # JSON lines whose bytes were replaced while parsing
        undecodable = int(pa.compute.sum(table.column(UNDECODABLE)).as_py() or 0)
        table = table.drop_columns([UNDECODABLE])
    texts, bad_bytes = decode_texts(table.column(text_column))
    present = np.fromiter((bool(text) and not text.isspace() for text in texts), bool, len(texts))
    rows = np.flatnonzero(present)
    labels = predictor.labels
    probabilities = np.zeros((len(texts), len(labels)), dtype=np.float32)
    for start in range(0, len(rows), slice_rows):
        chunk = rows[start : start + slice_rows]
        probabilities[chunk] = predictor.score([texts[i] for i in chunk]).probabilities
    missing = ~present
    predicted = np.asarray(labels, dtype=object)[probabilities.argmax(axis=1)]
    table = table.set_column(table.column_names.index(text_column), text_column, pa.array(texts, pa.string()))
    table = table.append_column(LABEL_COLUMN, pa.array(predicted, pa.string(), mask=missing))
    for j, label in enumerate(labels):
        table = table.append_column(PROBABILITY_PREFIX + label, pa.array(probabilities[:, j], mask=missing))
    counts = Counts(rows=len(texts), scored=len(rows), empty=int(missing.sum()), undecodable=bad_bytes + undecodable)
    return table, counts


def write_table(table: pa.Table, f: BinaryIO, fmt: str) -> None:
    """Write `table` to the open binary file `f` as Parquet, CSV (with a header) or JSON Lines.

    CSV and JSON Lines hold text, not bytes: a column of bytes is written as text, each byte that is not UTF-8 a
    U+FFFD, as the columns of a CSV input are read. Parquet keeps the bytes.
    """
    if fmt in ("csv", "jsonl"):
        table = _bytes_as_text(table)
    if fmt == "parquet":
        pq.write_table(table, f, compression="zstd")
    elif fmt == "csv":
        pa_csv.write_csv(table, f)
    elif fmt == "jsonl":
        for start in range(0, table.num_rows, BATCH_ROWS):
            rows = table.slice(start, BATCH_ROWS).to_pylist()
            f.write("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows).encode())
    else:
        raise UserError(f"cannot write {fmt!r}: use one of {', '.join(OUTPUT_FORMATS)}")


def _bytes_as_text(table: pa.Table) -> pa.Table:
    for i, field in enumerate(table.schema):
        if _holds_bytes(field.type):
            table = table.set_column(i, field.name, _lenient_strings(table.column(i).cast(pa.large_binary())))
    return table


def _holds_bytes(kind: pa.DataType) -> bool:
    types = pa.types
    if types.is_dictionary(kind):
        return _holds_bytes(kind.value_type)
    return any(is_(kind) for is_ in (types.is_binary, types.is_large_binary, types.is_binary_view,
                                     types.is_fixed_size_binary))


def _readable() -> str:
    return ".csv, .tsv, .jsonl, .parquet or .txt files"


def columns_of(file: str | Path, fmt: str, filesystem: pa_fs.FileSystem | None = None) -> list[str]:
    """The column names of `file`: the CSV header, the Parquet schema, or the fields of its first JSON objects.

    `filesystem` reads remote files (S3, GCS...); by default `file` is a local path.
    """
    if fmt == "txt":
        return [TEXT_LINES_COLUMN]
    if filesystem is None:
        filesystem, file = pa_fs.LocalFileSystem(), Path(file).resolve()
    try:
        if fmt == "parquet":
            return pq.read_schema(str(file), filesystem=filesystem).names
        with filesystem.open_input_stream(str(file)) as stream:
            if fmt in ("csv", "tsv"):
                convert = pa_csv.ConvertOptions(check_utf8=False)
                return pa_csv.open_csv(stream, parse_options=csv_parse_options(fmt), convert_options=convert).schema.names
            keys: dict[str, None] = {}  # the fields of the first objects, in order; lines that are not are skipped
            objects = 0
            for line in io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace"):  # -sig: a BOM is not text
                with contextlib.suppress(ValueError):
                    if line.strip() and isinstance(record := json.loads(line), dict):
                        keys.update(dict.fromkeys(record))
                        objects += 1
                        if objects == COLUMNS_SAMPLE:
                            break
            return list(keys)
    except (OSError, pa.ArrowException, ValueError) as err:
        raise UserError(f"cannot read {file}: {first_line(err)}") from None


def csv_parse_options(fmt: str, on_malformed: Callable[[pa_csv.InvalidRow], None] | None = None) -> pa_csv.ParseOptions:
    """CSV with quoted newlines allowed, or TSV without quoting (as fit reads it: a quote is part of the text); a row
    with the wrong number of fields is skipped (and reported)."""

    def skip(row: pa_csv.InvalidRow) -> str:
        if on_malformed is not None:
            on_malformed(row)
        return "skip"

    if fmt == "tsv":
        return pa_csv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=skip)
    return pa_csv.ParseOptions(delimiter=",", newlines_in_values=True, invalid_row_handler=skip)


def output_format_of(output: str | Path, output_format: str | None = None) -> str:
    """The format asked for, else the one the output folder's name ends with (scores.csv/), else Parquet."""
    if output_format is not None:
        if output_format not in OUTPUT_FORMATS:
            raise UserError(f"--output_format must be one of {', '.join(OUTPUT_FORMATS)}, not {output_format!r}")
        return output_format
    suffix = PurePosixPath(str(output).rstrip("/")).suffix.lower().lstrip(".")
    return suffix if suffix in OUTPUT_FORMATS else "parquet"


def _parquet_batches(file: Path) -> Iterator[pa.RecordBatch]:
    try:
        yield from pq.ParquetFile(file).iter_batches(batch_size=BATCH_ROWS)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"cannot read {file}: {first_line(err)}") from None


def _csv_reader(
    file: Path, fmt: str, convert: pa_csv.ConvertOptions, on_malformed: Callable[[str], None] | None
) -> pa_csv.CSVStreamingReader:
    def report(row: pa_csv.InvalidRow) -> None:
        if on_malformed is not None:
            on_malformed(f"row {row.number} of {file} (the header is row 1): {row.actual_columns} fields, not "
                         f"{row.expected_columns}")

    # One thread: batch scoring spends the cores on the model, and a single-threaded reader keeps row order cheap.
    read = pa_csv.ReadOptions(use_threads=False, block_size=1 << 22)
    return pa_csv.open_csv(file, read_options=read, parse_options=csv_parse_options(fmt, report), convert_options=convert)


def _csv_batches(
    file: Path, fmt: str, text_column: str, on_malformed: Callable[[str], None] | None
) -> Iterator[pa.RecordBatch]:
    names = columns_of(file, fmt)
    # read as bytes, decoded here: the text by score_table, counted; the others at once, each bad byte a U+FFFD
    convert = pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.binary()), strings_can_be_null=False)
    try:
        for batch in _csv_reader(file, fmt, convert, on_malformed):
            batch = lenient_csv_columns(batch, text_column)
            for start in range(0, batch.num_rows, BATCH_ROWS):
                yield batch.slice(start, BATCH_ROWS)
    except pa.ArrowException as err:
        raise UserError(f"cannot read {file}: {first_line(err)}") from None


def lenient_csv_columns(batch: pa.RecordBatch | pa.Table, text_column: str) -> pa.RecordBatch | pa.Table:
    """A batch of CSV columns read as bytes, each but the text as strings (each byte that is not UTF-8 a U+FFFD);
    the text stays bytes for `score_table`, which decodes it the same way and counts the texts it mended."""
    columns = [column if name == text_column else _lenient_strings(column)
               for name, column in zip(batch.schema.names, batch.columns)]
    return type(batch).from_arrays(columns, names=batch.schema.names)


def _lenient_strings(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Bytes as strings, each byte that is not UTF-8 a U+FFFD, as in a text."""
    try:
        return column.cast(pa.string())
    except pa.ArrowInvalid:
        return pa.array(decode_texts(column)[0], pa.string())


def jsonl_batches(
    lines: Iterable[bytes],
    file: str | Path,
    text_column: str,
    on_malformed: Callable[[str], None] | None,
    schema: pa.Schema | None = None,
) -> Iterator[pa.RecordBatch]:
    """The JSON objects of `lines` (those of `file`), parsed here so that one bad line costs only itself, as does
    a text that is not a string: it is skipped and passed to `on_malformed`. Each batch has the fields of every
    line so far, joined with `schema`'s (a field missing from a line is null there; null joins any type, an int a
    float)."""
    records: list[dict] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
            clean = True
        except UnicodeDecodeError:
            text, clean = line.decode("utf-8", errors="replace"), False
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if "\\u" in text and (cleaned := _without_lone_surrogates(record)) != record:  # escapes UTF-8 cannot hold
            record, clean = cleaned, False
        problem = ("is not a JSON object" if not isinstance(record, dict)
                   else None if isinstance(record.get(text_column), (str, type(None)))
                   else f"has a {type(record[text_column]).__name__} for its text, not a string")
        if problem is not None:
            if on_malformed is not None:
                on_malformed(f"line {number} of {file} {problem}")
            continue
        record[UNDECODABLE] = not clean
        records.append(record)
        if len(records) == BATCH_ROWS:
            schema, batch = _records_batch(records, schema, file)
            yield batch
            records = []
    if records:
        yield _records_batch(records, schema, file)[1]


def _without_lone_surrogates(value: object) -> object:
    """`value` with each lone surrogate in its strings (a JSON escape such as \\ud83d, cut from its pair) a U+FFFD."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(key): _without_lone_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    return value


def _records_batch(records: list[dict], schema: pa.Schema | None, file: str | Path) -> tuple[pa.Schema, pa.RecordBatch]:
    fields = dict.fromkeys(key for record in records for key in record)  # from_pylist would keep the first line's
    try:
        batch = pa.RecordBatch.from_pydict({key: [record.get(key) for record in records] for key in fields})
        if schema is None:
            return batch.schema, batch
        schema = _unified(schema, batch.schema)
        return schema, _conform(batch, schema)
    except (pa.ArrowException, TypeError, ValueError) as err:
        raise _type_changes(file, err) from None


def _unified(schema: pa.Schema, other: pa.Schema) -> pa.Schema:
    return pa.unify_schemas([schema, other], promote_options="permissive")  # null -> string, int -> float


def _type_changes(file: str | Path, err: Exception) -> UserError:
    return UserError(f"cannot read {file}: a field changes type between lines ({first_line(err)})")


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` with `schema`'s columns and types (a field missing from its lines is null)."""
    columns = []
    for field in schema:
        if field.name in batch.schema.names:
            columns.append(batch.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(batch.num_rows, field.type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _line_batches(file: Path) -> Iterator[pa.RecordBatch]:
    lines: list[bytes] = []
    for line in _binary_lines(file):
        lines.append(line.rstrip(b"\r\n"))
        if len(lines) == BATCH_ROWS:
            yield pa.RecordBatch.from_arrays([pa.array(lines, pa.binary())], names=[TEXT_LINES_COLUMN])
            lines = []
    if lines:
        yield pa.RecordBatch.from_arrays([pa.array(lines, pa.binary())], names=[TEXT_LINES_COLUMN])


def _binary_lines(file: Path) -> Iterator[bytes]:
    try:
        with open(file, "rb") as f:
            yield from _without_byte_order_mark(f)
    except OSError as err:
        raise UserError(f"cannot read {file}: {err.strerror}") from None


def stream_lines(stream: pa.NativeFile, block_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a pyarrow stream (a local or remote file), each ending in its newline, as `_binary_lines`
    gives a local file's; pyarrow's streams cannot read lines themselves."""

    def split() -> Iterator[bytes]:
        rest = b""
        while block := stream.read(block_bytes):
            *lines, rest = (rest + block).split(b"\n")
            yield from (line + b"\n" for line in lines)
        if rest:
            yield rest

    return _without_byte_order_mark(split())


def _without_byte_order_mark(lines: Iterable[bytes]) -> Iterator[bytes]:
    first = True
    for line in lines:
        if first and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not text
            line = line[3:]
        first = False
        yield line


def _count_lines(file: Path) -> int:
    count = 0
    last = b"\n"
    with open(file, "rb") as f:
        while block := f.read(1 << 24):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")
