"""Fault tolerance: resume after kill -9 and after SIGTERM, refused resumes, non-finite loss, bad checkpoints, determinism."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from nlprnn.callbacks.resume import check_resumable
from nlprnn.errors import UserError
from nlprnn.fit import main
from nlprnn.models.classifier import TextClassifier

TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 10  # 160 training examples of the tiny CSV in batches of 16


def tiny(csv: Path, out: Path, run: str | None, *extra: str) -> list[str]:
    """A tiny, dropout-free model on the tiny CSV: 3 epochs of 10 steps, LR warm-up then cosine decay."""
    return [
        "--data.train_file", str(csv), "--data.batch_size", "16",
        "--model.embedding_dim", "16", "--model.encoder.hidden_size", "16", "--model.encoder.num_layers", "1",
        "--model.encoder.direction", "forward", "--model.encoder.dropout", "0", "--model.embedding_dropout", "0",
        "--model.dropout", "0", "--model.lr", "0.01", "--model.warmup_steps", "4", "--model.lr_decay", "true",
        "--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "2", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--output_dir", str(out), *(["--run_name", run] if run else []), *extra,
    ]


class StallAt(Callback):
    """At optimizer step `step`, create `marker` and wait there until SIGTERM arrives (or a kill)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).touch()
            while not trainer.received_sigterm:
                time.sleep(0.05)


def fit_stalled_at(step: int, args: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`python -m nlprnn.fit ARGS` in the background, once it waits at optimizer step `step`; and its log."""
    marker, log = tmp_path / "stalled", tmp_path / "fit.log"
    args = [*args, "--trainer.callbacks+=test_faults.StallAt", f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.marker={marker}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}  # PYTHONPATH: for StallAt
    with log.open("w") as out:  # not a pipe: a full one would block the run
        proc = subprocess.Popen([sys.executable, "-m", "nlprnn.fit", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before reaching the step:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training did not reach the step in time")
        time.sleep(0.05)
    return proc, log


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_training(resumed: dict, uninterrupted: dict) -> None:
    """Same optimizer steps, LR schedule, weights and final validation accuracy as the uninterrupted run."""
    assert resumed["global_step"] == uninterrupted["global_step"] == 3 * STEPS_PER_EPOCH
    assert resumed["optimizer_states"][0]["state"][0]["step"] == 3 * STEPS_PER_EPOCH
    assert resumed["lr_schedulers"][0]["last_epoch"] == uninterrupted["lr_schedulers"][0]["last_epoch"]
    final_val_acc = [next(s["current_score"] for k, s in c["callbacks"].items() if "BestCheckpoint" in k)
                     for c in (resumed, uninterrupted)]
    assert abs(final_val_acc[0] - final_val_acc[1]) <= 0.1  # 20 validation examples: 2 of them
    # With the same batches in the same order (no dropout), the weights agree to rounding.
    for name, weight in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], weight, rtol=0, atol=1e-5, msg=name)


def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_csv):
    out = tmp_path / "runs"
    proc, _ = fit_stalled_at(6, tiny(tiny_csv, out, "killed", "--checkpoint_every_n_steps", "4"), tmp_path)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait(timeout=60)
    saved = load(out / "killed" / "last.ckpt")
    assert saved["global_step"] == 4  # the last every-4-steps save before step 6, mid-epoch 0
    assert not list((out / "killed").glob(".*tmp")), "a temporary checkpoint file was left behind"

    main(tiny(tiny_csv, out, "killed", "--ckpt_path", "last"))
    main(tiny(tiny_csv, out, "uninterrupted"))
    assert_same_training(load(out / "killed" / "last.ckpt"), load(out / "uninterrupted" / "last.ckpt"))


def test_sigterm_saves_a_loadable_last_checkpoint_and_resume_continues_it(tmp_path, tiny_csv):
    out = tmp_path / "runs"
    proc, log = fit_stalled_at(5, tiny(tiny_csv, out, "stopped", "--checkpoint_every_n_steps", "0"), tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    stderr = log.read_text()
    assert proc.returncode == 143, stderr[-3000:]
    resume = f"python -m nlprnn.fit --config {out / 'stopped' / 'config.yaml'} --ckpt_path last"
    assert f"stopped by SIGTERM at step 5; resume with {resume}\n" in stderr
    assert "Traceback" not in stderr
    saved = load(out / "stopped" / "last.ckpt")
    assert saved["global_step"] == 5
    position = saved["callbacks"]["RestoreLoaderPosition"]["batch_sampler"]
    assert (position["epoch"], position["position"], position["batch_size"]) == (0, 5, 16)
    assert "combined_loader" not in saved["loops"]["fit_loop"]["state_dict"]  # restored in one place only
    TextClassifier.load_from_checkpoint(out / "stopped" / "last.ckpt", map_location="cpu")
    (out / "stopped" / ".last.ckpt.k9x2.tmp").write_bytes(b"half a checkpoint")  # as a kill -9 mid-write leaves it

    main(resume.split()[3:])  # as printed: the run folder's config.yaml holds the rest
    assert not list((out / "stopped").glob(".*.tmp"))  # the resume removed it
    main(tiny(tiny_csv, out, "uninterrupted"))
    assert_same_training(load(out / "stopped" / "last.ckpt"), load(out / "uninterrupted" / "last.ckpt"))


class TermAt(Callback):
    """Sends this process SIGTERM at optimizer step `step`: an in-process stop, as a scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class TermInValidation(Callback):
    """Sends this process SIGTERM as the first epoch's validation starts (not the sanity check)."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == 0 and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_during_validation_lets_the_epoch_validate_then_stops(tmp_path, tiny_csv):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(tiny(tiny_csv, out, "stopped", "--checkpoint_every_n_steps", "0"), callbacks=[TermInValidation()])
    assert exit_info.value.code == 143
    saved = load(out / "stopped" / "last.ckpt")
    (best,) = [s for k, s in saved["callbacks"].items() if k.startswith("BestCheckpoint")]
    assert saved["global_step"] == STEPS_PER_EPOCH and best["best_epoch"] == 0  # the epoch's validation is in it
    assert load(out / "stopped" / "best.ckpt")["epoch"] == 0
    main(tiny(tiny_csv, out, "stopped", "--ckpt_path", "last"))
    main(tiny(tiny_csv, out, "uninterrupted"))
    assert_same_training(load(out / "stopped" / "last.ckpt"), load(out / "uninterrupted" / "last.ckpt"))


class CopyLastAtValidation(Callback):
    """Copies last.ckpt as it is when the first epoch's validation starts: what a kill -9 there would leave."""

    def __init__(self, last: Path, copy: Path) -> None:
        self.last, self.copy = last, copy

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == 0 and self.last.exists():
            self.copy.write_bytes(self.last.read_bytes())


def test_no_periodic_checkpoint_is_written_just_before_a_validation(tmp_path, tiny_csv):
    """Resumed from a last.ckpt written on the batch before a validation, Lightning would skip that validation."""
    out = tmp_path / "runs"
    copy = tmp_path / "at-validation.ckpt"
    main(tiny(tiny_csv, out, "periodic", "--checkpoint_every_n_steps", str(STEPS_PER_EPOCH // 2)),
         callbacks=[CopyLastAtValidation(out / "periodic" / "last.ckpt", copy)])
    assert load(copy)["global_step"] == STEPS_PER_EPOCH // 2  # the mid-epoch save, not one at the epoch's last step


class TermAtTest(Callback):
    """Sends this process SIGTERM as the test starts: after training, when Lightning's fit handlers are gone."""

    def on_test_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_after_training_stops_in_one_line_and_the_resume_only_tests(tmp_path, tiny_csv, capsys):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(tiny(tiny_csv, out, "tested-later"), callbacks=[TermAtTest()])
    assert exit_info.value.code == 143
    assert capsys.readouterr().err.strip().endswith(
        "nlprnn.fit: stopped by SIGTERM after training, before its test ended (last.ckpt holds the whole training); "
        f"test it with python -m nlprnn.fit --config {out / 'tested-later' / 'config.yaml'} --ckpt_path last")
    assert not (out / "tested-later" / "metrics.json").exists()
    trained = load(out / "tested-later" / "last.ckpt")["global_step"]
    assert trained == 3 * STEPS_PER_EPOCH
    metrics = main(tiny(tiny_csv, out, "tested-later", "--ckpt_path", "last"))
    assert "test_acc" in metrics and (out / "tested-later" / "metrics.json").exists()
    assert load(out / "tested-later" / "last.ckpt")["global_step"] == trained  # nothing trained again


class RecordBatches(Callback):
    """Every training batch's epoch and examples (its token ids and labels), in the order trained."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        seen = repr((batch["input_ids"].tolist(), batch["labels"].tolist()))
        self.batches.append((trainer.current_epoch, seen))


def stopped_at(step: int, args: list[str]) -> list[tuple[int, str]]:
    """Run in this process until SIGTERM at optimizer step `step`; the batches it trained on."""
    record = RecordBatches()
    with pytest.raises(SystemExit) as exit_info:
        main(args, callbacks=[record, TermAt(step)])
    assert exit_info.value.code == 143
    return record.batches


def test_resume_without_an_lr_schedule_trains_exactly_the_batches_of_an_uninterrupted_run(
    tmp_path, tiny_csv
):
    # No warm-up and no decay: nothing reads estimated_stepping_batches, so Lightning creates the loader
    # after loading the checkpoint (its own restore path); the position must still be restored exactly once.
    out, constant_lr = tmp_path / "runs", ["--model.warmup_steps", "0", "--model.lr_decay", "false"]
    before = stopped_at(13, tiny(tiny_csv, out, "stopped", *constant_lr, "--checkpoint_every_n_steps", "0"))
    assert len(before) == 13 and before[-1][0] == 1  # stopped mid-epoch 1, after 3 of its batches
    after, uninterrupted = RecordBatches(), RecordBatches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(tiny(tiny_csv, out, "stopped", *constant_lr, "--ckpt_path", "last"), callbacks=[after])
    # Lightning, which cannot see that the sampler resumes the epoch, would call the result unreliable
    assert not [w for w in caught if "ended before the epoch ended" in str(w.message)]
    main(tiny(tiny_csv, out, "uninterrupted", *constant_lr), callbacks=[uninterrupted])
    assert before + after.batches == uninterrupted.batches  # none repeated, none left out, same order
    resumed, whole = load(out / "stopped" / "last.ckpt"), load(out / "uninterrupted" / "last.ckpt")
    assert resumed["global_step"] == whole["global_step"] == 3 * STEPS_PER_EPOCH and not whole["lr_schedulers"]
    for name, weight in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], weight, rtol=0, atol=1e-5, msg=name)


def test_resuming_with_another_batch_size_is_refused_in_one_line_and_changes_nothing(
    tmp_path, tiny_csv, capsys
):
    out = tmp_path / "runs"
    stopped_at(5, tiny(tiny_csv, out, "stopped", "--checkpoint_every_n_steps", "0"))
    run = out / "stopped"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    resumed = tiny(tiny_csv, out, "stopped", "--ckpt_path", "last", "--data.batch_size", "8")
    with pytest.raises(SystemExit) as exit_info:
        main(resumed)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "nlprnn.fit: error: cannot resume: the batch size changed from 16 to 8 since last.ckpt, so its place in the "
        "epoch would name other examples; resume with --data.batch_size 16, or start a new run"
    ]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # config.yaml and last.ckpt untouched


def refused(args: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nlprnn.fit: error: ")]
    return line.removeprefix("nlprnn.fit: error: ")


def test_resuming_with_other_data_or_another_length_of_training_is_refused_and_changes_nothing(
    tmp_path, tiny_csv, capsys
):
    out = tmp_path / "runs"
    stopped_at(5, tiny(tiny_csv, out, "stopped", "--checkpoint_every_n_steps", "0"))
    run = out / "stopped"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    # the same examples, counts and lengths, every positive word swapped for a negative one: only the words differ
    rows = tiny_csv.read_text().splitlines()
    swapped = tmp_path / "swapped" / tiny_csv.name
    swapped.parent.mkdir()
    swapped.write_text("\n".join([rows[0]] + [row.replace("great", "awful") for row in rows[1:]]) + "\n")
    args = tiny(tiny_csv, out, "stopped", "--ckpt_path", "last")

    relative = os.path.relpath(tiny_csv)  # the same file, named otherwise: resumable (refused below for the budget)
    assert refused([*args, "--data.train_file", relative, "--trainer.max_epochs", "5"], capsys).startswith(
        "cannot resume: training was planned for 3 epochs")
    line = refused([*args, "--data.train_file", str(swapped)], capsys)
    assert line == (f"cannot resume: the data settings differ from last.ckpt's (data.train_file {str(tiny_csv)!r} "
                    f"then, {str(swapped)!r} now); resume with the settings it was trained with (in the run folder's "
                    "config.yaml), or start a new run")
    tiny_copy = tmp_path / "copy" / tiny_csv.name
    tiny_copy.parent.mkdir()
    tiny_copy.write_text(swapped.read_text())
    tiny_csv.rename(tmp_path / "original.csv")
    tiny_copy.rename(tiny_csv)  # the same path, other words
    assert refused(args, capsys).startswith("cannot resume: the tokenizer differs from last.ckpt's")
    tiny_csv.unlink()
    (tmp_path / "original.csv").rename(tiny_csv)

    line = refused([*args, "--trainer.max_epochs", "5"], capsys)
    assert line == ("cannot resume: training was planned for 3 epochs, no early stopping in last.ckpt, and for 5 "
                    "epochs, no early stopping now, which would reshape the learning-rate schedule; resume with "
                    "--trainer.max_epochs 3, or start a new run")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_run_bounded_by_max_steps_resumes_and_refuses_another_length(tmp_path, tiny_csv, capsys):
    out = tmp_path / "runs"
    steps = ["--trainer.max_epochs", "null", "--trainer.max_steps", "25", "--checkpoint_every_n_steps", "0"]
    stopped_at(5, tiny(tiny_csv, out, "stepped", *steps))
    run = out / "stepped"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    line = refused(tiny(tiny_csv, out, "stepped", *steps, "--trainer.max_steps", "12", "--ckpt_path", "last"), capsys)
    assert line == ("cannot resume: the length of training differs from last.ckpt's (trainer.max_steps 25 then, 12 "
                    "now), which would reshape the learning-rate schedule; resume with --trainer.max_steps 25, or "
                    "start a new run")
    line = refused(tiny(tiny_csv, out, "stepped", *steps, "--trainer.accumulate_grad_batches", "3", "--ckpt_path",
                        "last"), capsys)
    assert "(trainer.accumulate_grad_batches 1 then, 3 now)" in line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    main(tiny(tiny_csv, out, "stepped", *steps, "--ckpt_path", "last"))  # its own length: resumed to the end
    assert load(run / "last.ckpt")["global_step"] == 25


def test_a_checkpoint_without_the_batch_position_is_refused(tmp_path, tiny_csv, capsys):
    out = tmp_path / "runs"
    stopped_at(5, tiny(tiny_csv, out, "stopped", "--checkpoint_every_n_steps", "0"))
    checkpoint = load(out / "stopped" / "last.ckpt")
    del checkpoint["callbacks"]["RestoreLoaderPosition"]  # as an earlier nlprnn wrote it
    checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] = [{"epoch": 0, "batches": 5}]
    torch.save(checkpoint, out / "stopped" / "last.ckpt")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(tiny(tiny_csv, out, "stopped", "--ckpt_path", "last"))
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("nlprnn.fit: error: cannot resume: last.ckpt does not record the order of its training")


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_csv, monkeypatch, capsys
):
    training_step = TextClassifier.training_step

    def poisoned(self, batch, batch_idx):
        loss = training_step(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= 6 else loss  # from the 7th optimizer step on

    monkeypatch.setattr(TextClassifier, "training_step", poisoned)
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(tiny(tiny_csv, out, "nan", "--checkpoint_every_n_steps", "5"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nlprnn.fit: error: the training loss became NaN or infinite at step 7;")
    saved = load(out / "nan" / "last.ckpt")
    assert saved["global_step"] == 5
    assert all(torch.isfinite(w).all() for w in saved["state_dict"].values())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "weights only"])
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "last.ckpt"
    checkpoint = {"state_dict": {"w": torch.randn(64, 64)}, "optimizer_states": [{}], "loops": {}}
    if damage == "weights only":
        checkpoint = {"state_dict": checkpoint["state_dict"]}
    torch.save(checkpoint, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match="truncated or corrupt" if damage != "weights only" else "no training state"):
        check_resumable(path)


def test_resuming_from_a_truncated_last_checkpoint_is_one_line_on_stderr(tmp_path, tiny_csv, capsys):
    run = tmp_path / "runs" / "broken"
    run.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, run / "last.ckpt")
    (run / "last.ckpt").write_bytes((run / "last.ckpt").read_bytes()[:100])
    with pytest.raises(SystemExit) as exit_info:
        main(tiny(tiny_csv, tmp_path / "runs", "broken", "--ckpt_path", "last"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"nlprnn.fit: error: cannot resume: {run / 'last.ckpt'} is not a readable checkpoint")
    assert run.is_dir()  # the user's run folder is never removed


def test_two_runs_with_the_same_seed_give_identical_metrics(tmp_path, tiny_csv):
    # Dropout on, so the seeded random stream matters too.
    dropout = ["--model.embedding_dropout", "0.2", "--model.dropout", "0.2", "--trainer.max_epochs", "2"]
    first = main(tiny(tiny_csv, tmp_path / "runs", "first", *dropout))
    second = main(tiny(tiny_csv, tmp_path / "runs", "second", *dropout))
    assert first == second and all(math.isfinite(v) for v in first.values())
    for name, metrics in (("first", first), ("second", second)):  # one process, each run in its own folder
        assert json.loads((tmp_path / "runs" / name / "metrics.json").read_text()) == metrics
    a, b = (load(tmp_path / "runs" / r / "last.ckpt")["state_dict"] for r in ("first", "second"))
    assert all(torch.equal(a[name], b[name]) for name in a)
