"""Export: exact on padded batches for every encoder, dynamic axes, a self-check that fails loudly, the CLIs."""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import nlprnn.export as export
from nlprnn.data.datamodule import TextDataModule
from nlprnn.deploy import Predictor
from nlprnn.deploy.bundle import read_bundle
from nlprnn.deploy.predictor import make_session
from nlprnn.export import ExportCheckFailed, checkpoint_data, export_model, export_onnx, load_checkpoint
from nlprnn.models.classifier import TextClassifier
from nlprnn.models.encoder import RNNEncoder

from conftest import CELLS, DIRECTIONS, POOLINGS, make_examples, write_csv
from deploy.tiny_bundles import write_tokenizer

VOCAB = 19  # the tiny tokenizer's size
LABELS = ["a", "b", "c"]
TOLERANCE = 1e-4
MIXED_LENGTHS = [1, 300, 2, 17, 299, 150, 64, 3, 250, 5, 100, 1, 42, 8, 200, 33, 120]  # 17 rows


def tiny_model(cell="lstm", direction="bidirectional", pooling="last", num_layers=2, residual=False,
               ngram_dim=0, recurrent_length=None, recurrent_tail=0, ngram_distinct=False,
               branch_loss=0.0, linear_blend=0.0) -> TextClassifier:
    """Random weights with dropout on everywhere: export must switch it off to match eval-mode PyTorch."""
    torch.manual_seed(0)
    encoder = functools.partial(
        RNNEncoder, cell=cell, hidden_size=4, num_layers=num_layers, direction=direction, dropout=0.3, residual=residual
    )
    return TextClassifier(VOCAB, len(LABELS), embedding_dim=4, embedding_dropout=0.3, encoder=encoder, pooling=pooling,
                          dropout=0.3, ngram_dim=ngram_dim, ngram_buckets=7, recurrent_length=recurrent_length,
                          recurrent_tail=recurrent_tail, ngram_distinct=ngram_distinct, branch_loss=branch_loss,
                          linear_blend=linear_blend)


def random_batch(lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(B, max length) ids, padded with 0 after each row's real tokens, and (B,) lengths."""
    rng = np.random.default_rng(seed)
    lengths = np.array(lengths, dtype=np.int64)
    ids = rng.integers(1, VOCAB, size=(len(lengths), lengths.max()), dtype=np.int64)
    ids[np.arange(ids.shape[1]) >= lengths[:, None]] = 0
    return ids, lengths


def max_difference(model: TextClassifier, session, lengths: list[int]) -> float:
    """Largest |ONNX - PyTorch| logit on a random batch of the given lengths."""
    ids, lengths = random_batch(lengths, seed=len(lengths))
    (onnx_logits,) = session.run(["logits"], {"input_ids": ids, "lengths": lengths})
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
    return float(np.abs(onnx_logits - torch_logits).max())


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")




@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("cell", CELLS)
def test_export_is_exact_on_mixed_length_batches(tmp_path, cell, direction, pooling, num_layers):
    assert_exact_export(tiny_model(cell, direction, pooling, num_layers), tmp_path)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("cell", CELLS)
def test_export_is_exact_for_deep_residual_stacks(tmp_path, cell, direction):
    assert_exact_export(tiny_model(cell, direction, "mean", num_layers=3, residual=True), tmp_path)


@pytest.mark.parametrize("distinct, tail", [(False, 0), (True, 0), (True, 40)])
@pytest.mark.parametrize("cell", CELLS)
def test_export_is_exact_with_an_ngram_bag(tmp_path, cell, distinct, tail):
    """Hashed word pairs are integer arithmetic in the graph, a distinct bag's sort a TopK, and the recurrence's
    cut a slice (with a tail, a Gather at each row's length): exact on every length (1..300, some beyond the 100
    tokens the recurrence reads), padding ignored. The branches' own heads only train: the graph leaves them out."""
    model = tiny_model(cell, "bidirectional", "max", ngram_dim=3, recurrent_length=100, recurrent_tail=tail,
                       ngram_distinct=distinct, branch_loss=1.0)
    assert_exact_export(model, tmp_path)


@pytest.mark.parametrize("cell", CELLS)
def test_export_is_exact_with_a_linear_blend(tmp_path, cell):
    """The linear model's sort, run counts (a scatter) and row norms, and the blend's log-sum-exp: exact on every
    length, padding ignored, with texts that repeat words and pairs (so counts above 1 weigh in)."""
    model = tiny_model(cell, "bidirectional", "max", ngram_dim=3, recurrent_length=100, ngram_distinct=True,
                       branch_loss=1.0, linear_blend=0.5)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 40)
    ids = rng.integers(1, 6, lengths.sum()) * rng.integers(1, 4, lengths.sum()) % VOCAB  # few ids: many repeats
    model.linear.fit(ids, np.concatenate([[0], np.cumsum(lengths)]), rng.integers(0, len(LABELS), len(lengths)))
    assert model.linear.weight.abs().sum() > 0
    assert_exact_export(model, tmp_path)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_padding_that_overflows_a_relu_recurrence_changes_nothing_in_onnx(tmp_path, pooling):
    """A relu recurrence with gain 1.5 runs on through 300 padding steps past float32's largest value: the
    graph, like PyTorch, keeps those states out of every result (inf * 0 would be NaN)."""
    model = tiny_model("rnn_relu", "bidirectional", pooling).eval()
    with torch.no_grad():
        for layer in model.encoder.layers:
            for rnn in layer:
                rnn.weight_hh_l0.copy_(1.5 * torch.eye(4))
                rnn.bias_hh_l0.fill_(0.1)
    export_onnx(model, tmp_path / "model.onnx")
    session = make_session(tmp_path / "model.onnx", threads=1)
    ids, lengths = random_batch([3, 5])
    padded = np.pad(ids, ((0, 0), (0, 300)))
    (alone,) = session.run(["logits"], {"input_ids": ids, "lengths": lengths})
    (far,) = session.run(["logits"], {"input_ids": padded, "lengths": lengths})
    with torch.no_grad():
        torch_far = model(torch.from_numpy(padded), torch.from_numpy(lengths)).numpy()
    assert np.isfinite(far).all()
    assert np.abs(far - alone).max() <= TOLERANCE
    assert np.abs(torch_far - alone).max() <= TOLERANCE


def assert_exact_export(model: TextClassifier, tmp_path: Path) -> None:
    """ONNX logits within TOLERANCE of PyTorch's on 17 mixed lengths 1..300 and on single rows of 1 and 300."""
    model.eval()
    export_onnx(model, tmp_path / "model.onnx")
    assert not model.training, "export must leave the model in eval mode"
    session = make_session(tmp_path / "model.onnx", threads=1)
    assert max_difference(model, session, MIXED_LENGTHS) <= TOLERANCE  # batch of 17
    for length in (1, 300):  # batch of 1
        assert max_difference(model, session, [length]) <= TOLERANCE


def test_a_short_tracing_example_still_serves_long_texts(tmp_path, tokenizer_file):
    model = tiny_model()
    bundle = export_model(model, tmp_path / "bundle", tokenizer_file, LABELS, max_length=300, example_length=5)
    graph = onnx.load(str(bundle / "model.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"input_ids": ["batch", "time"], "lengths": ["batch"]}
    predictor = Predictor(bundle, threads=1)
    text = " ".join(["good movie plot"] * 100)  # 300 tokens
    (ids,) = predictor.encode([text])
    assert len(ids) == 300
    with torch.no_grad():
        expected = model(torch.tensor([ids]), torch.tensor([300])).numpy()
    np.testing.assert_allclose(predictor.score([text]).logits, expected, rtol=0, atol=TOLERANCE)


def exporting_a_different_model(monkeypatch, shift: float = 0.1) -> None:
    """Make export write a model whose output layer differs from the one it checks against."""
    real_export_onnx = export.export_onnx

    def export_perturbed(model, path, example_length=export.EXAMPLE_LENGTH):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.head[-1].bias[0] += shift  # one class: the same shift of all of them is no change at all
        real_export_onnx(other, path, example_length)

    monkeypatch.setattr(export, "export_onnx", export_perturbed)


def test_a_failed_check_leaves_no_bundle(tmp_path, tokenizer_file, monkeypatch):
    exporting_a_different_model(monkeypatch)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ExportCheckFailed, match=r"differ from PyTorch's by 0\.\d+ .*no bundle was written"):
        export_model(tiny_model(), out, tokenizer_file, LABELS, max_length=50)
    assert list(out.parent.iterdir()) == []  # neither the bundle nor its scratch folder


def test_an_onnx_model_that_gives_nan_fails_the_check(tmp_path, tokenizer_file, monkeypatch):
    exporting_a_different_model(monkeypatch, shift=math.nan)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ExportCheckFailed, match=r"differ from PyTorch's by inf .*no bundle was written"):
        export_model(tiny_model(), out, tokenizer_file, LABELS, max_length=50)
    assert list(out.parent.iterdir()) == []


def test_a_model_whose_own_logits_are_nan_is_not_exported(tmp_path, tokenizer_file):
    model = tiny_model()
    with torch.no_grad():
        model.head[-1].weight[0, 0] = math.nan
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ExportCheckFailed, match=r"own logits are NaN or infinite .*no bundle was written"):
        export_model(model, out, tokenizer_file, LABELS, max_length=50)
    assert list(out.parent.iterdir()) == []


def test_mismatched_tokenizer_or_labels(tmp_path, tokenizer_file):
    with pytest.raises(export.UserError, match="3 classes but there are 2 labels"):
        export_model(tiny_model(), tmp_path / "b", tokenizer_file, LABELS[:2], max_length=50)
    small = TextClassifier(5, 3)
    with pytest.raises(export.UserError, match="has 19 tokens, more than the model's 5"):
        export_model(small, tmp_path / "b", tokenizer_file, LABELS, max_length=50)
    assert not (tmp_path / "b").exists()


# --- from a run folder of `python -m nlprnn.fit` ---

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real (tiny, one-epoch) fit run with --export true."""
    from nlprnn.fit import main as fit

    root = tmp_path_factory.mktemp("fit")
    data = write_csv(root / "tiny.csv", make_examples(120))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NLPRNN_CACHE", str(root / "cache"))
        env.setenv("WANDB_MODE", "offline")
        fit([
            "--data.train_file", str(data), "--data.max_length", "40", "--data.batch_size", "16",
            "--model.embedding_dim", "8", "--model.encoder.hidden_size", "8", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger", "false", "--output_dir", str(root / "runs"), "--run_name", "tiny", "--export", "true",
        ])
    return root / "runs" / "tiny"


def test_fit_exports_the_best_checkpoint_when_asked(run_dir):
    bundle = run_dir / "bundle"
    manifest = json.loads((bundle / "nlprnn.json").read_text())
    assert manifest["test_metrics"] == json.loads((run_dir / "metrics.json").read_text())
    assert manifest["max_length"] == 40  # as trained, read from the run folder
    assert manifest["encoder"]["hidden_size"] == 8 and manifest["encoder"]["direction"] == "bidirectional"
    hparams = load_checkpoint(run_dir / "best.ckpt").hparams
    for key in ("recurrent_length", "recurrent_tail", "linear_blend"):  # what it reads, and the linear share
        assert manifest["encoder"][key] == hparams[key]
    assert manifest["encoder"]["ngram_dim"] == 0  # short texts: derived without a bag
    assert json.loads((bundle / "labels.json").read_text()) == ["negative", "positive"]
    # From raw text, the bundle computes what the checkpoint computes.
    model = load_checkpoint(run_dir / "best.ckpt").eval()
    predictor = Predictor(bundle, threads=1)
    texts = [row["text"] for row in make_examples(20, seed=1)] + ["an unseen word salad " * 30]
    for text, logits in zip(texts, predictor.score(texts).logits):
        (ids,) = predictor.encode([text])
        with torch.no_grad():
            expected = model(torch.tensor([ids]), torch.tensor([len(ids)]))[0].numpy()
        np.testing.assert_allclose(logits, expected, rtol=0, atol=TOLERANCE)


def test_fit_help_documents_the_export_flag(capsys):
    from nlprnn.fit import main as fit

    with pytest.raises(SystemExit) as exit_info:
        fit(["--help"])
    assert exit_info.value.code == 0
    assert "--export" in capsys.readouterr().out


def test_export_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert export.main([str(run_dir / "best.ckpt"), "--out", str(out)]) == out
    assert f"bundle written to {out}" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        export.main([str(run_dir), "--out", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("already exists; choose another --out or pass --overwrite to replace it")

    assert json.loads((out / "nlprnn.json").read_text())["test_metrics"] is not None
    export.main([str(run_dir / "last.ckpt"), "--out", str(out), "--overwrite"])
    assert json.loads((out / "nlprnn.json").read_text())["test_metrics"] is None  # they were measured on best.ckpt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no scratch or old copy left


def test_overwrite_replaces_only_a_bundle_folder(run_dir, tmp_path, capsys):
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(SystemExit) as exit_info:  # the run folder itself: replacing it would delete the run
        export.main([str(run_dir), "--out", str(run_dir), "--overwrite"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("; --overwrite replaces only a bundle") and "best.ckpt" in error
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_a_destination_that_cannot_be_a_bundle_folder_is_one_line(run_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.csv").write_text("a,b\n")
    monkeypatch.chdir(tmp_path)
    for out, message in [(".", "--out . is the current folder or holds it"),
                         ("..", "--out .. is the current folder or holds it"),
                         ("notes.csv/bundle", f"cannot make notes.csv/bundle: {tmp_path / 'notes.csv'} is a file")]:
        with pytest.raises(SystemExit) as exit_info:
            export.main([str(run_dir), "--out", out, "--overwrite"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == f"nlprnn.export: error: {message}" + (
            "; name a folder for the bundle inside it" if "current" in message else "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.csv"]


def test_export_cli_fails_loudly_when_the_check_fails(run_dir, tmp_path, capsys, monkeypatch):
    exporting_a_different_model(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(run_dir), "--out", str(tmp_path / "bundle")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nlprnn.export: error: the ONNX model's logits differ") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("problem", ["missing", "corrupt", "old, no tokenizer", "old, alone"])
def test_export_cli_bad_checkpoints(run_dir, tmp_path, capsys, problem):
    folder = tmp_path / "run"
    folder.mkdir()
    if problem == "old, no tokenizer":
        (folder / "labels.json").write_bytes((run_dir / "labels.json").read_bytes())
    if problem == "corrupt":
        (folder / "best.ckpt").write_bytes(b"not a checkpoint")
    elif problem.startswith("old"):
        without_data_settings(run_dir / "best.ckpt", folder / "best.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    expected = {
        "missing": "checkpoint not found",
        "corrupt": "is not a readable nlprnn checkpoint",
        "old, no tokenizer": "carries no labels or tokenizer (it was written by an older nlprnn) and",
        "old, alone": "carries no labels or tokenizer (it was written by an older nlprnn) and",
    }[problem]
    assert expected in err and "Traceback" not in err and err.count("\n") == 1
    assert not (folder / "bundle").exists()


# --- checkpoints that describe themselves ---

def without_data_settings(source: Path, target: Path) -> Path:
    """A copy of checkpoint `source` as nlprnn wrote them before they carried labels, tokenizer and data settings."""
    state = torch.load(source, map_location="cpu", weights_only=False)
    del state[TextDataModule.__qualname__]
    torch.save(state, target)
    return target


@pytest.mark.parametrize("name", ["best.ckpt", "last.ckpt"])
def test_checkpoints_carry_labels_tokenizer_and_data_settings(run_dir, name):
    saved = checkpoint_data(run_dir / name)
    assert saved["labels"] == json.loads((run_dir / "labels.json").read_text()) == ["negative", "positive"]
    assert saved["tokenizer"] == (run_dir / "tokenizer.json").read_text()  # the run folder's copy is written from it
    assert json.loads(saved["tokenizer"])["truncation"]["max_length"] == 40
    data = saved["data"]
    assert data["max_length"] == 40 and data["text_column"] == "text" and data["label_column"] == "label"
    assert Path(data["train_file"]).name == "tiny.csv"
    if name == "last.ckpt":
        assert saved["calibration"] is None  # written before the temperature was fitted
    else:
        assert saved["calibration"]["method"] == "temperature" and saved["calibration"]["temperature"] > 0


def test_the_bundle_carries_the_checkpoints_temperature(run_dir):
    temperature = checkpoint_data(run_dir / "best.ckpt")["calibration"]["temperature"]
    assert read_bundle(run_dir / "bundle").manifest.temperature == temperature


def test_a_lone_checkpoint_exports_like_its_run_folder(run_dir, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "best.ckpt").write_bytes((run_dir / "best.ckpt").read_bytes())
    export.export_checkpoint(lone / "best.ckpt")
    assert sorted(p.name for p in lone.iterdir()) == ["best.ckpt", "bundle"]
    manifest = json.loads((lone / "bundle" / "nlprnn.json").read_text())
    assert manifest["max_length"] == 40 and manifest["test_metrics"] is None  # no metrics.json beside it
    # A checkpoint from before, beside its run folder's files, exports as it did.
    old = tmp_path / "old"
    old.mkdir()
    for name in ("labels.json", "tokenizer.json", "config.yaml", "metrics.json"):
        (old / name).write_bytes((run_dir / name).read_bytes())
    without_data_settings(run_dir / "best.ckpt", old / "best.ckpt")
    assert checkpoint_data(old / "best.ckpt") is None
    export.export_checkpoint(old)
    assert json.loads((old / "bundle" / "nlprnn.json").read_text())["test_metrics"] is not None

    texts = [row["text"] for row in make_examples(12, seed=2)] + ["an unseen word salad " * 30, ""]
    expected = Predictor(run_dir / "bundle", threads=1)
    for bundle in (lone / "bundle", old / "bundle"):
        predictor = Predictor(bundle, threads=1)
        assert predictor.labels == expected.labels
        assert [p[0] for p in predictor.predict(texts)] == [p[0] for p in expected.predict(texts)]
        # logits: the old checkpoint carries no temperature, so its probabilities are the plain softmax
        np.testing.assert_allclose(predictor.score(texts).logits, expected.score(texts).logits, rtol=0, atol=1e-6)


def test_resuming_with_other_labels_is_refused(tiny_csv):
    data = TextDataModule(train_file=str(tiny_csv))
    data.prepare()
    saved = data.state_dict()
    data.load_state_dict(saved)  # the same data: nothing to say
    with pytest.raises(export.UserError, match=r"trained on the labels \['positive', 'negative'\], but this data has"):
        data.load_state_dict({**saved, "labels": ["positive", "negative"]})
