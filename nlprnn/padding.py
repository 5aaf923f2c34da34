"""Padding token id rows into one batch: the same code for training batches and for prediction."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) int64 ids, each row's real tokens first and `pad_id` after, T its longest row; (B,) int64 lengths."""
    lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    ids = np.full((len(rows), int(lengths.max(initial=0))), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, lengths
