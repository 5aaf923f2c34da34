"""The nlprnn cache directory and atomic writes into it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """`$NLPRNN_CACHE`, or `~/.cache/nlprnn`."""
    return Path(os.environ.get("NLPRNN_CACHE") or Path.home() / ".cache" / "nlprnn").expanduser()


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that becomes `final` only if the block succeeds.

    Readers therefore never see a half-written entry, and a failure leaves nothing behind.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield scratch
        if final.exists():  # another process finished first; its copy is as good as ours
            shutil.rmtree(scratch)
        else:
            os.replace(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
