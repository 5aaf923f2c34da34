"""Writes that nobody sees half-done: one file writer and one folder publisher, used by every output.

A file is written to a temporary name beside its target, flushed to disk, then renamed over it, and
the rename is flushed too; a folder is filled under a scratch name beside its target, then renamed
into place. A kill at any moment leaves either the old content or the new, never a mix, and a
failure removes the temporary.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """A binary file open for writing that replaces `path` when the block ends without an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)  # makes the rename itself durable


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as f:
        f.write(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def copy_file(source: Path, path: Path) -> None:
    with replacing(path) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f)


@contextmanager
def publishing(final: Path, replace: bool = False) -> Iterator[Path]:
    """A scratch folder beside `final` that becomes `final` when the block ends without an error.

    If `final` exists by then, `replace` swaps it out; otherwise the existing folder is kept (another
    process published the same content first) and the scratch folder is dropped.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield scratch
        os.chmod(scratch, 0o755)  # mkdtemp makes folders private; outputs are ordinary folders
        if not final.exists():
            os.replace(scratch, final)
        elif replace:
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(scratch, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    _fsync_folder(final.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows) has no folder fsync either
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
