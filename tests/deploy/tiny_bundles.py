"""Tiny bundles for the serving tests: random weights, a word tokenizer trained on a few sentences.

Imported as `deploy.tiny_bundles` (tests/ is on the path); not a conftest.py, so that `from conftest
import ...` keeps meaning tests/conftest.py everywhere.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from nlprnn.data.tokenizer import TokenizerConfig, train_tokenizer
from nlprnn.export import export_model
from nlprnn.models.classifier import TextClassifier
from nlprnn.models.encoder import RNNEncoder

WORDS = "good great fine bad awful dull the movie plot story acting was is a and of it".split()
LABELS = ["negative", "neutral", "positive"]
MAX_LENGTH = 300


def write_tokenizer(path: Path) -> Path:
    tokenizer = train_tokenizer([" ".join(WORDS)] * 3, TokenizerConfig(vocab_size=100))
    tokenizer.save(str(path))
    return path


def build_bundle(out: Path, max_length: int = MAX_LENGTH, seed: int = 0, **encoder: object) -> Path:
    """Export a freshly initialised classifier to `out`: by default a 2-layer bidirectional LSTM with mean pooling.

    Dropout is on in the model, so a bundle that matches PyTorch also shows that export switched it off.
    """
    tokenizer_file = write_tokenizer(out.parent / f"{out.name}-tokenizer.json")
    torch.manual_seed(seed)
    model = TextClassifier(
        vocab_size=len(WORDS) + 2, num_classes=len(LABELS), embedding_dim=6, embedding_dropout=0.2, dropout=0.2,
        encoder=functools.partial(RNNEncoder, hidden_size=5, dropout=0.2, **encoder), pooling="mean",
    )
    return export_model(model, out, tokenizer_file, LABELS, max_length)
