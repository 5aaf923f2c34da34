"""The nlprnn cache directory: fetched datasets, word vectors and prepared (tokenized) splits."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """`$NLPRNN_CACHE`, else the platform's user cache folder: `$XDG_CACHE_HOME/nlprnn` (`~/.cache/nlprnn`) on Linux."""
    if os.environ.get("NLPRNN_CACHE"):
        return Path(os.environ["NLPRNN_CACHE"]).expanduser()
    return platformdirs.user_cache_path("nlprnn", appauthor=False)



def file_identity(path: str | Path) -> dict:
    """Resolved path, size and modification time: what makes a file another version, for cache keys."""
    p = Path(path)
    if not p.exists():
        return {"path": str(p)}
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def digest(key: object) -> str:
    """A short, stable name for a JSON-able cache key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
