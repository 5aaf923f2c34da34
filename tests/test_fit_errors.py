"""python -m nlprnn.fit on mistakes: impossible options and changed resumes are one line and leave nothing, while
a failure after training has started (the baseline) never costs the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nlprnn.errors import UserError
from nlprnn.fit import FitCLI, main
from test_fit import TINY_MODEL, fit


def tiny(csv: Path, out: Path, run: str, *extra: str) -> list[str]:
    """One epoch of a tiny model on the tiny CSV, without a logger."""
    return ["--data.train_file", str(csv), *TINY_MODEL, "--trainer.max_epochs", "1", "--trainer.logger", "false",
            "--output_dir", str(out), "--run_name", run, *extra]


OPTIONS = [
    (["--data.batch_size", "0"], "data.batch_size is the number of examples in a batch, at least 1: got 0"),
    (["--data.batch_size", "-1"], "data.batch_size is the number of examples in a batch, at least 1: got -1"),
    (["--data.max_length", "0"], "data.max_length is a number of tokens, at least 1 (or null to derive it): got 0"),
    (["--data.max_length", "-3"], "data.max_length is a number of tokens, at least 1 (or null to derive it): got -3"),
    (["--model.dropout", "1.5"], "model.dropout is a probability in [0, 1): got 1.5"),
    (["--model.weight_decay", "-1"], "model.weight_decay must be a finite number, 0 or more: got -1.0"),
    (["--model.encoder.num_layers", "0"], "model.encoder.num_layers is a number of stacked layers, at least 1: got 0"),
    (["--model.encoder.hidden_size", "0"], "model.encoder.hidden_size is a state width, at least 1: got 0"),
    pytest.param(["--trainer.accelerator", "gpu"], "the trainer settings cannot be used: No supported gpu backend found",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")),
    (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be at least 1: got 0"),
    (["--trainer.check_val_every_n_epoch", "0"], "trainer.check_val_every_n_epoch must be at least 1: got 0"),
    (["--trainer.log_every_n_steps", "-1"], "trainer.log_every_n_steps must be at least 0: got -1"),
    # refused by Lightning as training starts, after the run folder was made: it is taken away again
    (["--trainer.val_check_interval", "1000"],
     "the trainer settings cannot be used: `val_check_interval` (1000) must be less than or equal to the number"),
    (["--output_dir", "{file}"], "is not a folder (a file is in its way); name a folder"),
    (["--output_dir", "{file}/runs"], "is not a folder (a file is in its way); name a folder"),
]


@pytest.mark.parametrize("args, message", OPTIONS)
def test_an_impossible_option_is_one_line_and_leaves_no_folder(tmp_path, tiny_csv, args, message):
    (tmp_path / "a-file").write_text("not a folder")
    args = [a.format(file=tmp_path / "a-file") for a in args]
    proc = fit("--data.train_file", str(tiny_csv), *TINY_MODEL, "--trainer.logger", "false",
               "--output_dir", str(tmp_path / "out" / "runs"), "--run_name", "bad", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nlprnn.fit: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # neither the run folder nor the --output_dir made for it
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_a_baseline_that_fails_after_training_is_a_warning_and_the_run_is_kept(tmp_path, tiny_csv, monkeypatch, capsys):
    import nlprnn.data.sources as sources

    def source_gone(spec):  # as when the CSV moved during training, or a Hub dataset is out of reach offline
        raise UserError(f"file not found: {spec.train_file}")

    monkeypatch.setattr(sources, "load_splits", source_gone)
    metrics = main(tiny(tiny_csv, tmp_path / "runs", "kept"))
    run = tmp_path / "runs" / "kept"
    assert {"best.ckpt", "last.ckpt", "config.yaml", "metrics.json"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "metrics.json").read_text()) == metrics and "test_acc" in metrics
    assert not [name for name in metrics if name.startswith("baseline_")]
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("nlprnn.fit: warning:")]
    assert warnings == ["nlprnn.fit: warning: the TF-IDF + logistic-regression baseline was left out: "
                        f"file not found: {tiny_csv}"]
    assert f"test accuracy {metrics['test_acc']:.4f}" in out and "TF-IDF + logistic regression:" not in out


def test_a_data_file_edited_during_training_keeps_the_run_and_leaves_out_the_baseline(tmp_path, tiny_csv, capsys):
    import lightning as L

    class EditTheFile(L.Callback):  # as a user who appends rows to the file while the model trains
        def on_train_epoch_end(self, trainer, pl_module):
            with tiny_csv.open("a") as f:
                f.write("one more row,pos\n")

    metrics = main(tiny(tiny_csv, tmp_path / "runs", "edited", "--trainer.max_epochs", "2"), callbacks=[EditTheFile()])
    run = tmp_path / "runs" / "edited"
    assert {"best.ckpt", "last.ckpt", "metrics.json"} <= {p.name for p in run.iterdir()} and "test_acc" in metrics
    assert not [name for name in metrics if name.startswith("baseline_")]  # it would have learnt from other rows
    assert capsys.readouterr().err.splitlines()[-1] == ("nlprnn.fit: warning: the TF-IDF + logistic-regression "
                                                       "baseline was left out: the data files changed or moved since "
                                                       "they were prepared")


def test_resuming_with_other_model_settings_is_one_line_and_changes_nothing(tmp_path, tiny_csv, capsys):
    out = tmp_path / "runs"
    main(tiny(tiny_csv, out, "first"))
    before = {p.name: p.read_bytes() for p in (out / "first").iterdir() if p.is_file()}
    capsys.readouterr()
    changed = ["--model.encoder.hidden_size", "32", "--model.dropout", "0.1"]
    with pytest.raises(SystemExit) as exit_info:
        main(tiny(tiny_csv, out, "first", "--ckpt_path", "last", *changed))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "nlprnn.fit: error: cannot resume: the model settings differ from last.ckpt's (model.dropout 0.3 then, 0.1 "
        "now, model.encoder.hidden_size 16 then, 32 now); resume with the settings it was trained with (in the run "
        "folder's config.yaml), or start a new run"
    ]
    assert {p.name: p.read_bytes() for p in (out / "first").iterdir() if p.is_file()} == before  # config.yaml too
    # Into a new run folder: refused alike, and the folder it would have made is not left behind.
    with pytest.raises(SystemExit):
        main(tiny(tiny_csv, out, "second", "--ckpt_path", str(out / "first" / "last.ckpt"), *changed))
    assert not (out / "second").exists()


@pytest.mark.parametrize(
    "trainer, left_open",
    [
        ({}, True),
        ({"max_epochs": None, "max_steps": -1, "max_time": None, "fast_dev_run": False}, True),
        ({"fast_dev_run": 0}, True),
        ({"max_epochs": -1}, False),  # explicitly no limit: not the Trainer's unset None
        ({"max_epochs": 0}, False),
        ({"max_epochs": 3}, False),
        ({"max_steps": 0}, False),
        ({"max_steps": 200}, False),
        ({"max_time": "00:00:10:00"}, True),  # a cap beside the derived length, not a length
        ({"fast_dev_run": True}, False),
    ],
)
def test_an_explicit_training_length_is_never_replaced_by_the_derived_one(trainer, left_open):
    assert FitCLI.budget_left_open(trainer) is left_open
