"""int8 bundles: quantized where onnxruntime can, judged by label agreement, refused without leaving anything."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import nlprnn.export as export
import nlprnn.quantize as quantize
from nlprnn.data.datamodule import TextDataModule
from nlprnn.deploy import Predictor
from nlprnn.deploy.bundle import read_bundle
from nlprnn.quantize import Validation

from conftest import make_examples
from test_export import LABELS, run_dir, tiny_model, tokenizer_file  # noqa: F401 (fixtures)


def op_counts(bundle: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(bundle / "model.onnx")).graph.node)


def test_an_int8_bundle_is_smaller_predicts_and_records_its_agreement(run_dir, tmp_path, capsys):
    float_bundle = export.main([str(run_dir), "--out", str(tmp_path / "float")])
    int8_bundle = export.main([str(run_dir), "--out", str(tmp_path / "int8"), "--quantize", "int8"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"bundle written to {int8_bundle}"
    assert printed[-2].startswith("int8 keeps the float model's label on ") and "kept float" not in printed[-2]

    record = json.loads((int8_bundle / "nlprnn.json").read_text())["quantization"]
    assert record["type"] == "int8" and record["label_agreement"] >= quantize.MIN_LABEL_AGREEMENT
    assert record["float_parts"] == []  # all of it int8: enough labels kept at the first try
    assert record["validation_texts"] == 12  # 10% of the 120 examples, split off as in training
    assert 0 <= record["accuracy_float"] <= 1 and 0 <= record["accuracy_int8"] <= 1
    assert read_bundle(float_bundle).manifest.quantization is None  # a float bundle says so by having none

    ops = op_counts(int8_bundle)
    assert ops["DynamicQuantizeLSTM"] == 4 and ops["LSTM"] == 0  # 2 layers x 2 directions
    assert ops["MatMulInteger"] == 1  # the head
    assert (int8_bundle / "model.onnx").stat().st_size < (float_bundle / "model.onnx").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "int8"]  # no scratch or temporary model left
    assert sorted(p.name for p in int8_bundle.iterdir()) == ["labels.json", "model.onnx", "nlprnn.json", "tokenizer.json"]

    texts = [row["text"] for row in make_examples(20, seed=3)] + ["", "an unseen word salad " * 30]
    predictions = Predictor(int8_bundle, threads=1).predict(texts)
    assert [label for label, _ in predictions] == [label for label, _ in Predictor(float_bundle, threads=1).predict(texts)]
    for _, probabilities in predictions:
        assert set(probabilities) == {"negative", "positive"} and abs(sum(probabilities.values()) - 1) < 1e-5


def test_too_little_agreement_is_refused_and_leaves_nothing(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quantize, "MIN_LABEL_AGREEMENT", 1.01)  # no model can reach it
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(run_dir), "--out", str(tmp_path / "bundle"), "--quantize", "int8"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nlprnn.export: error: the int8 model predicts the float model's label on only 100.00% of "
                          "12 validation texts (100.00% with the linear float, 100.00% with the linear and embedding "
                          "float) (at least 101% required); no bundle was written to")
    assert "\n" not in err
    assert list(tmp_path.iterdir()) == []


def labels_moved_by_int8(table: str):
    """predicted_labels, with every label flipped (two classes) while the initializer `table` is int8."""
    real = quantize.predicted_labels

    def moved(bundle: Path, texts):
        initializers = {i.name for i in onnx.load(str(bundle / "model.onnx")).graph.initializer}
        return real(bundle, texts) ^ (table not in initializers)

    return moved


def initializer_type(bundle: Path, name: str) -> int:
    return next(i for i in onnx.load(str(bundle / "model.onnx")).graph.initializer if i.name == name).data_type


def test_the_linear_model_stays_float_when_its_int8_weights_move_too_many_labels(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quantize, "predicted_labels", labels_moved_by_int8("model.linear.weight"))
    bundle = export.main([str(run_dir), "--out", str(tmp_path / "int8"), "--quantize", "int8"])
    assert read_bundle(bundle).manifest.quantization["float_parts"] == ["linear"]
    assert initializer_type(bundle, "model.linear.weight") == onnx.TensorProto.FLOAT
    assert "model.embedding.weight" not in {i.name for i in onnx.load(str(bundle / "model.onnx")).graph.initializer}
    assert op_counts(bundle)["DynamicQuantizeLSTM"] == 4  # the rest is int8 still
    assert capsys.readouterr().out.splitlines()[-2].endswith("; the linear kept float")


def test_the_embedding_table_stays_float_too_when_int8_moves_too_many_labels(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quantize, "predicted_labels", labels_moved_by_int8("model.embedding.weight"))
    bundle = export.main([str(run_dir), "--out", str(tmp_path / "int8"), "--quantize", "int8"])
    record = read_bundle(bundle).manifest.quantization
    assert record["float_parts"] == ["linear", "embedding"] and record["label_agreement"] >= quantize.MIN_LABEL_AGREEMENT
    assert initializer_type(bundle, "model.embedding.weight") == onnx.TensorProto.FLOAT
    assert op_counts(bundle)["DynamicQuantizeLSTM"] == 4  # the rest is int8 still
    assert sorted(p.name for p in bundle.iterdir()) == ["labels.json", "model.onnx", "nlprnn.json", "tokenizer.json"]
    assert capsys.readouterr().out.splitlines()[-2].endswith("; the linear and embedding kept float")


def test_int8_without_its_validation_data_is_refused(run_dir, tmp_path, capsys):
    state = torch.load(run_dir / "best.ckpt", map_location="cpu", weights_only=False)
    state[TextDataModule.__qualname__]["data"]["train_file"] = str(tmp_path / "moved.csv")
    torch.save(state, tmp_path / "moved.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "moved.ckpt"), "--out", str(tmp_path / "bundle"), "--quantize", "int8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "int8 needs the validation split" in err and "file not found" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved.ckpt"]


def test_int8_from_another_folder_than_the_run_was_trained_in_says_so(run_dir, tmp_path, capsys):
    state = torch.load(run_dir / "best.ckpt", map_location="cpu", weights_only=False)
    state[TextDataModule.__qualname__]["data"]["train_file"] = "data/tiny.csv"  # as typed, in the run's folder
    torch.save(state, tmp_path / "relative.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "relative.ckpt"), "--out", str(tmp_path / "bundle"), "--quantize", "int8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("(data/tiny.csv is relative to the folder the run was trained in: export from there)"), err


def test_gru_recurrences_stay_float_and_their_head_is_quantized(tmp_path, tokenizer_file, monkeypatch):
    monkeypatch.setattr(quantize, "MIN_LABEL_AGREEMENT", 0.0)  # random weights: this test is about the graph
    texts = ["good movie", "bad plot", "good good plot movie"]
    validation = Validation(texts, np.array([0, 1, 2]))
    bundle = export.export_model(tiny_model("gru"), tmp_path / "bundle", tokenizer_file, LABELS, max_length=50,
                                 quantize="int8", validation=validation)
    ops = op_counts(bundle)
    assert ops["GRU"] == 4 and ops["MatMulInteger"] == 1 and ops["DynamicQuantizeLSTM"] == 0
    assert read_bundle(bundle).manifest.quantization["validation_texts"] == 3
    assert len(Predictor(bundle, threads=1).predict(texts)) == 3


def test_int8_needs_validation_texts(tmp_path, tokenizer_file):
    with pytest.raises(export.UserError, match="int8 needs validation texts"):
        export.export_model(tiny_model(), tmp_path / "bundle", tokenizer_file, LABELS, max_length=50, quantize="int8")
    with pytest.raises(export.UserError, match="unknown quantization 'int4'"):
        export.export_model(tiny_model(), tmp_path / "bundle", tokenizer_file, LABELS, max_length=50, quantize="int4")
    assert not (tmp_path / "bundle").exists()
