"""ConfusionMatrixReport: per-class precision and recall from the test logits, and the PNG it writes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from nlprnn.callbacks.report import ConfusionMatrixReport, plot_confusion_matrix

LABELS = ["negative", "neutral", "positive"]


class Recorder:
    """Stands in for a LightningModule at test time: collects what is logged."""

    def __init__(self, num_classes: int) -> None:
        self.hparams = SimpleNamespace(num_classes=num_classes)
        self.device = torch.device("cpu")
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: torch.Tensor, **_) -> None:
        self.logged[name] = float(value)


def run_report(counts: list[list[int]], run_dir: Path, batch_size: int = 4) -> dict[str, float]:
    """Feed the report logits whose argmax gives `counts` (rows true, columns predicted), in batches."""
    pairs = [(t, p) for t, row in enumerate(counts) for p, n in enumerate(row) for _ in range(n)]
    true, predicted = torch.tensor(pairs).T  # (N,), (N,)
    logits = torch.nn.functional.one_hot(predicted, len(counts)).float() * 4 - 2  # (N, C)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(labels=LABELS), is_global_zero=True, loggers=[])
    module, report = Recorder(len(counts)), ConfusionMatrixReport(run_dir)
    report.on_test_epoch_start(trainer, module)
    for start in range(0, len(pairs), batch_size):
        batch = {"labels": true[start : start + batch_size]}
        report.on_test_batch_end(trainer, module, logits[start : start + batch_size], batch, start // batch_size)
    report.on_test_epoch_end(trainer, module)
    return module.logged


def test_per_class_precision_and_recall_are_logged_by_label(tmp_path):
    # class "positive" never occurs and is never predicted: both scores are 0, not NaN
    logged = run_report([[5, 1, 0], [2, 3, 0], [0, 0, 0]], tmp_path)
    expected = {
        "test_precision_negative": 5 / 7, "test_precision_neutral": 3 / 4, "test_precision_positive": 0.0,
        "test_recall_negative": 5 / 6, "test_recall_neutral": 3 / 5, "test_recall_positive": 0.0,
    }
    assert logged == {name: np.float32(value).item() for name, value in expected.items()}


def test_a_class_predicted_but_never_true_has_zero_precision_and_zero_recall(tmp_path):
    logged = run_report([[4, 0, 1], [0, 2, 1], [0, 0, 0]], tmp_path)
    assert logged["test_precision_positive"] == 0.0 and logged["test_recall_positive"] == 0.0
    assert logged["test_recall_negative"] == np.float32(4 / 5).item()


def test_the_report_writes_the_confusion_matrix_png(tmp_path):
    run_report([[5, 1, 0], [2, 3, 0], [0, 1, 2]], tmp_path)
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_prints_counts_and_label_names(monkeypatch):
    from matplotlib.axes import Axes

    texts: list[str] = []
    real_text = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, **kw: texts.append(s) or real_text(self, x, y, s, **kw))
    ticks: list[list[str]] = []
    real_ticks = Axes.set_xticks
    monkeypatch.setattr(Axes, "set_xticks", lambda self, t, labels=None, **kw: ticks.append(labels)
                        or real_ticks(self, t, labels, **kw))
    png = plot_confusion_matrix(np.array([[8, 2], [1, 9]]), ["negative", "positive"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert texts == ["8", "2", "1", "9"] and ticks == [["negative", "positive"]]
