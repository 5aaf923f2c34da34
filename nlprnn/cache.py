"""The nlprnn cache directory: fetched datasets, word vectors and prepared (tokenized) splits."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """`$NLPRNN_CACHE`, else the platform's user cache folder: `$XDG_CACHE_HOME/nlprnn` (`~/.cache/nlprnn`) on Linux."""
    if os.environ.get("NLPRNN_CACHE"):
        return Path(os.environ["NLPRNN_CACHE"]).expanduser()
    return platformdirs.user_cache_path("nlprnn", appauthor=False)

