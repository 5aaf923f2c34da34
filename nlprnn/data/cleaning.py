"""Bad input, handled in the open: invalid UTF-8 replaced, empty texts dropped, missing labels refused.

Every repair is counted and logged; nothing is dropped silently. The scans read Arrow record batches,
never a whole column as Python objects, so they stay cheap on corpora of millions of rows.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nlprnn.atomic import replacing, write_bytes
from nlprnn.cache import cache_dir, digest, file_identity
from nlprnn.errors import UserError

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 20  # bytes per read when checking a file's encoding
SCAN_ROWS = 10_000  # rows per Arrow batch when scanning a column
SHOWN_ROWS = 5  # rows named in an error message


class _ReplacementCounter:
    """A codecs error handler that puts U+FFFD for each invalid byte sequence and counts them."""

    def __init__(self) -> None:
        self.count = 0
        self.name = f"nlprnn-count-replace-{id(self)}"
        codecs.register_error(self.name, self)

    def __call__(self, err: UnicodeDecodeError) -> tuple[str, int]:
        self.count += 1
        return "\ufffd", err.end


def _is_utf8(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(READ_BLOCK), b""):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _encoding(path: Path) -> str:
    """utf-16 for a file that starts with a UTF-16 byte order mark (Excel's "Unicode text"), else utf-8."""
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and head != codecs.BOM_UTF32_LE:
        return "utf-16"
    return "utf-8"


def repair_utf8(path: Path) -> tuple[Path, int]:
    """(`path`, 0) for a valid UTF-8 file; else (a UTF-8 copy in the cache, how many byte sequences it replaced).

    A file with a UTF-16 byte order mark is read as UTF-16, any other as UTF-8. The copy is made once per
    file version and read in blocks, so memory stays flat for any file size.
    """
    encoding = _encoding(path)
    if encoding == "utf-16":
        log.info("%s is UTF-16 (it starts with a byte order mark): read as such", path)
    elif _is_utf8(path):
        return path, 0
    copy = cache_dir() / "repaired" / f"{path.stem}-{digest(file_identity(path))}{path.suffix}"
    count_file = copy.with_name(copy.name + ".replaced")
    if copy.exists() and count_file.exists():
        return copy, int(count_file.read_text())
    counter = _ReplacementCounter()
    decoder = codecs.getincrementaldecoder(encoding)(errors=counter.name)  # utf-16 drops the byte order mark
    with path.open("rb") as src, replacing(copy) as dst:  # a scratch file of its own: two runs may repair at once
        for block in iter(lambda: src.read(READ_BLOCK), b""):
            dst.write(decoder.decode(block).encode("utf-8"))
        dst.write(decoder.decode(b"", final=True).encode("utf-8"))
    write_bytes(count_file, str(counter.count).encode())
    return copy, counter.count


def arrow_batches(ds, column: str) -> Iterator:
    """The pyarrow arrays of one column of a `datasets.Dataset`, `SCAN_ROWS` rows at a time, in row order."""
    for table in ds.select_columns([column]).with_format("arrow").iter(batch_size=SCAN_ROWS):
        yield table.column(0)


def rows_where(ds, column: str, predicate) -> np.ndarray:
    """Row numbers (0-based) where `predicate(arrow_array)` is true; the boolean mask is built batch by batch."""
    masks = [np.asarray(predicate(array).to_numpy(zero_copy_only=False), dtype=bool) for array in arrow_batches(ds, column)]
    return np.flatnonzero(np.concatenate(masks)) if masks else np.zeros(0, dtype=np.int64)


def _is_blank(array):
    import pyarrow.compute as pc

    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(array)), 0)
    return pc.fill_null(blank, True)  # a missing text is as empty as an empty one


def drop_empty_texts(ds, split: str):
    """`ds` without rows whose text is missing, empty or only whitespace, with a warning that counts them."""
    blank = rows_where(ds, "text", _is_blank)
    if len(blank) == 0:
        return ds
    log.warning("dropped %d empty or whitespace-only text(s) from the %s split", len(blank), split)
    keep = np.setdiff1d(np.arange(len(ds)), blank, assume_unique=True)
    return ds.select(keep)


def _no_label(array):
    """Missing, NaN (pandas' and Parquet's missing number), or a string of nothing but whitespace."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_floating(array.type):
        return pc.fill_null(pc.is_nan(array), True)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return _is_blank(array)
    return pc.is_null(array)


def check_labels(ds, where: str) -> None:
    """Refuse rows with no label, naming the first few (1-based data rows, the header not counted)."""
    missing = rows_where(ds, "label", _no_label)
    if len(missing):
        rows = ", ".join(str(i + 1) for i in missing[:SHOWN_ROWS])
        raise UserError(
            f"{where} has {len(missing)} row(s) with no label, the first at data row(s) {rows}; "
            "label them or remove them"
        )
