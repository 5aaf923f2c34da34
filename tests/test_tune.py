"""python -m nlprnn.tune: pruning, outputs, resuming, several processes on one study, and bad input."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from filelock import FileLock

from nlprnn import tune

TINY = [
    "--model.embedding_dim", "16",
    "--model.encoder.hidden_size", "16",
    "--model.embedding_dropout", "0",
    "--model.warmup_steps", "0",  # the default recipe warms up over 100 steps: more than a tiny trial has
    "--data.batch_size", "16",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.logger", "false",
]
GOOD_LR, BAD_LR = 0.02, 0.000001  # on the tiny data: near 1.0 validation accuracy within 3 epochs, and chance
SPACE = f"""
model.lr: {{type: categorical, choices: [{GOOD_LR}, {BAD_LR}]}}
model.dropout: {{type: float, low: 0.0, high: 0.3}}
"""


def tune_cli(*args: str, cwd: Path, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nlprnn.tune", *args]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def read_trials(output: Path) -> list[dict[str, str]]:
    with (output / "trials.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path


def test_search_prunes_a_bad_trial_and_writes_a_best_config_that_fit_runs(tmp_path, tiny_csv, space):
    out = tmp_path / "out"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # The first trials of a study are whatever was enqueued: good, bad, good, whatever the sampler would do.
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    for lr, dropout in ((GOOD_LR, 0.2), (BAD_LR, 0.0), (GOOD_LR, 0.0)):
        study.enqueue_trial({"model.lr": lr, "model.dropout": dropout})

    proc = tune_cli("--space", str(space), "--data.train_file", str(tiny_csv), *TINY, "--trainer.max_epochs", "5",
                    "--n_trials", "3", "--study_name", "tiny", "--storage", storage, "--output_dir", str(out),
                    "--pruner_startup_trials", "1", "--pruner_warmup_epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert trials[1].last_step == 2  # stopped at the first epoch it could be, not trained to the end
    assert min(trials[0].value, trials[2].value) >= 0.9
    assert "trial 1: pruned at epoch 2" in proc.stdout
    rows = read_trials(out)
    assert [(r["number"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "PRUNED"), ("2", "COMPLETE")]
    assert rows[1]["model.lr"] == str(BAD_LR) and rows[1]["epochs"] == "2"
    assert (out / "optimization_history.png").stat().st_size > 0 and (out / "param_importances.png").stat().st_size > 0
    best = trials[0] if trials[0].value >= trials[2].value else trials[2]
    assert f"best validation accuracy {best.value:.4f} (trial {best.number}" in proc.stdout
    assert f"python -m nlprnn.fit --config {out / 'best.yaml'}" in proc.stdout
    # Validation only: no trial tested its model (fit writes metrics.json after the test).
    assert sorted(p.name for p in (out / "trials" / "tiny").iterdir()) == ["trial-0", "trial-1", "trial-2"]
    assert not list((out / "trials").glob("*/*/metrics.json"))

    config = (out / "best.yaml").read_text()
    assert f"lr: {GOOD_LR}" in config and f"dropout: {best.params['model.dropout']}" in config
    assert "run_name: null" in config and "output_dir: checkpoints" in config and "trial-" not in config
    fit = subprocess.run([sys.executable, "-m", "nlprnn.fit", "--config", str(out / "best.yaml"), "--print_config"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert f"lr: {GOOD_LR}" in fit.stdout and str(tiny_csv) in fit.stdout and "hidden_size: 16" in fit.stdout


def test_the_same_command_resumes_the_study(tmp_path, tiny_csv, space):
    out = tmp_path / "out"
    args = ["--space", str(space), "--data.train_file", str(tiny_csv), *TINY, "--trainer.max_epochs", "1",
            "--pruner", "none", "--output_dir", str(out)]
    first = tune_cli(*args, "--n_trials", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = tune_cli(*args, "--n_trials", "3", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(2 finished trials)" in second.stdout and "trial 2:" in second.stdout and "trial 0:" not in second.stdout
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{out / 'study.db'}")
    assert summary.study_name == "tiny-space" and summary.n_trials == 3
    assert [r["number"] for r in read_trials(out)] == ["0", "1", "2"]


def test_two_processes_share_one_study(tmp_path, tiny_csv, space):
    out = tmp_path / "out"
    args = ["--space", str(space), "--data.train_file", str(tiny_csv), *TINY, "--trainer.max_epochs", "15",
            "--pruner", "none", "--n_trials", "4", "--output_dir", str(out)]
    workers = [tune_cli(*args, "--seed", str(seed), cwd=tmp_path, wait=False) for seed in (1, 2)]
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-3000:]
    rows = read_trials(out)
    # Each process checks the count after its own trial, so the two may overshoot by one between them.
    assert 4 <= len(rows) <= 5 and all(r["state"] == "COMPLETE" for r in rows)
    assert sorted(int(r["number"]) for r in rows) == list(range(len(rows)))
    pids = {int(r["worker"].rsplit(":", 1)[1]) for r in rows}
    assert pids == {w.pid for w in workers}, rows
    assert sorted(p.name for p in (out / "trials" / "tiny-space").iterdir()) == [f"trial-{r['number']}" for r in rows]


@pytest.mark.parametrize(
    "space_text, extra, message",
    [
        ("model.no_such_thing: {type: float, low: 0.1, high: 0.2}", [],
         "model.no_such_thing is not a parameter of nlprnn.fit"),
        ("model.lr: {type: float, low: 0.01, high: 0.001}", [], "model.lr: empty range: low 0.01 is above high 0.001"),
        ("model.lr: {type: float, low: 0, high: 0.01, log: true}", [], "model.lr: log needs low > 0"),
        ("model.lr: {type: uniform, low: 0.001, high: 0.01}", [], "model.lr: expected {type: int | float | categorical"),
        ("model.pooling: {type: categorical, choices: [last, sideways]}", [], "model.pooling cannot be 'sideways'"),
        ("model.linear_blend: {type: float, low: 0.2, high: 0.8}", [], "model.linear_blend cannot be searched"),
        ("model.linear_c: {type: float, low: 1, high: 1000, log: true}", [], "model.linear_c cannot be searched"),
        ("data.batch_size: {type: int, low: 8.5, high: 64}", [], "data.batch_size: low must be an integer"),
        (SPACE, ["--run_name", "mine"], "the fit configuration sets run_name (mine)"),
        (SPACE, ["--trainer.max_epochz", "3"], "the fit configuration does not parse"),
        (SPACE, ["--data.train_file", "missing.csv"], "file not found: missing.csv"),
        (SPACE, ["--storage", "postgresql://127.0.0.1:1/x"], "cannot open the study storage postgresql://127.0.0.1:1/x"),
        (SPACE, ["--storage", "sqlite:///{tmp}/a-file/sub/study.db"], "cannot open the study storage sqlite:///"),
        (SPACE, ["--storage", "no url"], "--storage 'no url' is not a database URL"),
        (SPACE, ["--pruner_startup_trials", "-1"], "--pruner_startup_trials must be 0 or more, not -1"),
        (SPACE, ["--pruner_warmup_epochs", "-2"], "--pruner_warmup_epochs must be 0 or more, not -2"),
        (SPACE, ["--timeout_min", "nan"], "--timeout_min must be a positive number, not nan"),
        ("model.encoder.hidden_size: {type: int, low: 4, high: 8}\n"
         "model.encoder.init_args.hidden_size: {type: int, low: 4, high: 8}", [],
         "model.encoder.init_args.hidden_size is listed twice (also as model.encoder.hidden_size); list it once"),
        ("model.lr: {type: float, low: 0.001, high: 0.01}\n--model.lr: {type: categorical, choices: [0.1]}", [],
         "model.lr is listed twice; list it once"),
        ("output_dir: {type: categorical, choices: [a, b]}", [], "output_dir cannot be searched: nlprnn.tune sets it"),
        ("trainer.devices: {type: categorical, choices: [1, 2]}", [], "trainer.devices cannot be searched"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, tiny_csv, capfd, monkeypatch, space_text, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text(space_text)
    (tmp_path / "a-file").write_text("not a folder")
    extra = [a.format(tmp=tmp_path) for a in extra]
    if "--data.train_file" not in extra:
        extra = ["--data.train_file", str(tiny_csv), *extra]
    with pytest.raises(SystemExit) as stop:
        tune.main(["--space", "space.yaml", *TINY, *extra, "--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("nlprnn.tune: error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out").exists() and not (tmp_path / "checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "space.yaml", "tiny.csv"]


def test_an_error_in_the_space_ends_the_command_with_one_line(tmp_path):
    (tmp_path / "space.yaml").write_text("model.no_such_thing: {type: float, low: 0.1, high: 0.2}\n")
    proc = tune_cli("--space", "space.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "nlprnn.tune: error: search space space.yaml: model.no_such_thing is not a parameter of nlprnn.fit "
        "(`python -m nlprnn.fit --help` lists them; `--model.encoder.help RNNEncoder` the encoder's)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_a_diverged_trial_fails_alone_and_an_interrupt_stops_the_search_resumably(tmp_path, tiny_csv, space,
                                                                                  monkeypatch, capsys):
    """Trials are nlprnn.fit.run calls; stand-ins show what the search does when one diverges or is interrupted."""
    from nlprnn import fit
    from nlprnn.callbacks.nonfinite import NonFiniteLoss

    def run(args, callbacks=(), test=True, resume_hint=True):
        assert test is False  # selection on validation only
        lr = float(args[args.index("--model.lr", len(TINY)) + 1])
        if lr == BAD_LR:
            raise NonFiniteLoss("the training loss became NaN or infinite at step 3; stopped without saving")
        return {"best_val_acc": 0.75}

    monkeypatch.setattr(fit, "run", run)
    out = tmp_path / "out"
    out.mkdir()
    study = optuna.create_study(study_name="tiny-space", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    study.enqueue_trial({"model.lr": BAD_LR})  # the first trial diverges, whatever the sampler would pick
    args = ["--space", str(space), "--data.train_file", str(tiny_csv), *TINY, "--output_dir", str(out)]
    tune.main([*args, "--n_trials", "4"])
    rows = read_trials(out)
    assert len(rows) == 4 and {r["state"] for r in rows} == {"COMPLETE", "FAIL"}, rows
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert all(r["error"] == "the training loss became NaN or infinite at step 3" for r in failed)
    assert f"trial {failed[0]['number']}: failed (the training loss became NaN" in capsys.readouterr().out

    def interrupted(args, callbacks=(), test=True, resume_hint=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit, "run", interrupted)
    with pytest.raises(SystemExit) as stop:
        tune.main([*args, "--n_trials", "6"])
    assert stop.value.code == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    cut, retry = read_trials(out)[4:]  # recorded, not left running; and queued to run again
    assert cut["state"] == "FAIL" and cut["error"] == "interrupted; run again when the search resumes"
    assert retry["state"] == "WAITING"
    # resumed, the search runs the interrupted trial's values again, and counts only trials that ended by themselves
    monkeypatch.setattr(fit, "run", run)
    tune.main([*args, "--n_trials", "6"])
    rows = read_trials(out)
    assert len(rows) == 7 and rows[4]["state"] == "FAIL" and rows[5]["state"] == "COMPLETE"  # 6 counted
    assert rows[5]["model.lr"] == cut["model.lr"] and rows[5]["model.dropout"] == cut["model.dropout"]


# --- one study, one base configuration; trial folders per study -------------------------------------------


GOOD_SPACE = SPACE.replace(f", {BAD_LR}", "")  # every trial trains, and so has a run folder


@pytest.fixture
def stand_in_fit(monkeypatch):
    """fit.run as a trial sees it: it claims the run folder as fit does, refuses what `refused` says, else scores."""
    from nlprnn import fit
    from nlprnn.errors import UserError
    from nlprnn.run_dir import claim_run_dir

    def run(args, callbacks=(), test=True, resume_hint=True):
        lr = float(args[args.index("--model.lr", len(TINY)) + 1])
        if lr == BAD_LR:  # refused before fit claims its run folder
            raise UserError(f"model.lr {lr} is below what this model accepts; choose another")
        run_dir = claim_run_dir(Path(args[args.index("--output_dir") + 1]), args[args.index("--run_name") + 1],
                                resuming=False)
        (run_dir / "config.yaml").write_text("")
        return {"best_val_acc": 0.75}

    monkeypatch.setattr(fit, "run", run)


def search(tmp_path, tiny_csv, *extra: str, space: str = SPACE, n_trials: int = 2) -> None:
    (tmp_path / "space.yaml").write_text(space)
    tune.main(["--space", str(tmp_path / "space.yaml"), "--data.train_file", str(tiny_csv), *TINY,
               "--output_dir", str(tmp_path / "out"), "--n_trials", str(n_trials), *extra])


def refused(capfd, tmp_path, tiny_csv, *extra: str, space: str = SPACE) -> str:
    """The one error line of a search that must be refused, which must leave the output folder as it was."""
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        search(tmp_path, tiny_csv, *extra, space=space, n_trials=4)
    assert stop.value.code == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("nlprnn.tune: error:")]
    assert len(errors) == 1, errors
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    return errors[0]


@pytest.mark.parametrize("change", [["--model.weight_decay", "0.1"], ["--config", "other.yaml"]])
def test_a_study_refuses_a_search_with_another_base_configuration(tmp_path, tiny_csv, stand_in_fit, capfd, change):
    (tmp_path / "other.yaml").write_text("model:\n  pooling: mean\n")
    change = [a.replace("other.yaml", str(tmp_path / "other.yaml")) for a in change]
    search(tmp_path, tiny_csv, "--seed", "1", space=GOOD_SPACE)
    error = refused(capfd, tmp_path, tiny_csv, *change, space=GOOD_SPACE)
    assert error == (f"nlprnn.tune: error: study tiny-space in sqlite:///{tmp_path / 'out' / 'study.db'} was run "
                     "with another base configuration (--config and fit flags); give this search another "
                     "--study_name, or run it with the study's own configuration")
    # Another name is another study, beside the first; its trials get their own folders.
    search(tmp_path, tiny_csv, *change, "--study_name", "other", space=GOOD_SPACE)
    studies = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'out' / 'study.db'}")}
    assert studies == {"tiny-space": 2, "other": 2}
    assert sorted(p.name for p in (tmp_path / "out" / "trials" / "other").iterdir()) == ["trial-0", "trial-1"]


def test_a_study_goes_on_with_what_leaves_its_trials_comparable(tmp_path, tiny_csv, stand_in_fit):
    search(tmp_path, tiny_csv)
    # another seed, data loading parallelism, the base value of a searched parameter
    search(tmp_path, tiny_csv, "--seed", "7", "--data.num_workers", "1", "--model.lr", "0.5", n_trials=3)
    # a range widened, and a dimension added (the old trials ran with its base value)
    wider = SPACE.replace("high: 0.3", "high: 0.5") + "model.weight_decay: {type: float, low: 0.0, high: 0.1}\n"
    search(tmp_path, tiny_csv, space=wider, n_trials=4)
    rows = read_trials(tmp_path / "out")
    assert len(rows) == 4 and rows[3]["model.weight_decay"] and not rows[0]["model.weight_decay"]


def test_a_study_refuses_changed_categorical_choices(tmp_path, tiny_csv, stand_in_fit, capfd):
    search(tmp_path, tiny_csv)
    changed = SPACE.replace(f"[{GOOD_LR}, {BAD_LR}]", f"[{GOOD_LR}, 0.005]")
    error = refused(capfd, tmp_path, tiny_csv, space=changed)
    assert error == (f"nlprnn.tune: error: search space {tmp_path / 'space.yaml'}: model.lr is categorical "
                     f"[{GOOD_LR}, 0.005], but study tiny-space sampled it as categorical [{GOOD_LR}, {BAD_LR}]; "
                     "give this search another --study_name")


def test_a_trial_that_fit_refuses_fails_alone(tmp_path, tiny_csv, stand_in_fit, capsys):
    out = tmp_path / "out"
    out.mkdir()
    study = optuna.create_study(study_name="tiny-space", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    study.enqueue_trial({"model.lr": BAD_LR})
    search(tmp_path, tiny_csv, n_trials=3)
    message = f"model.lr {BAD_LR} is below what this model accepts; choose another"
    assert f"trial 0: failed ({message})" in capsys.readouterr().out
    rows = read_trials(out)
    assert len(rows) == 3 and rows[0]["state"] == "FAIL" and rows[0]["error"] == message
    # fit discards the run folder of a run it refuses; the other trials have theirs
    completed = [f"trial-{r['number']}" for r in rows if r["state"] == "COMPLETE"]
    assert completed and sorted(p.name for p in (out / "trials" / "tiny-space").iterdir()) == sorted(completed)


def test_a_search_whose_every_trial_fails_stops_after_three(tmp_path, tiny_csv, stand_in_fit, capsys):
    out = tmp_path / "out"
    out.mkdir()
    study = optuna.create_study(study_name="tiny-space", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    for _ in range(3):
        study.enqueue_trial({"model.lr": BAD_LR})
    with pytest.raises(SystemExit) as stop:
        search(tmp_path, tiny_csv, n_trials=6)  # the fourth trial, sampled, would have completed
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "3 trials in a row failed and none has completed; the search stops" in err
    assert f"nlprnn.tune: error: no trial completed; trials.csv in {out} lists what happened" in err
    assert [row["state"] for row in read_trials(out)] == ["FAIL"] * 3


def test_a_study_started_over_is_told_to_delete_the_old_trial_folders(tmp_path, tiny_csv, stand_in_fit, capfd):
    out = tmp_path / "out"
    search(tmp_path, tiny_csv, space=GOOD_SPACE)
    (out / "study.db").unlink()
    error = refused(capfd, tmp_path, tiny_csv, space=GOOD_SPACE)
    assert error == (f"nlprnn.tune: error: {out / 'trials' / 'tiny-space'} holds trial folders (trial-0, trial-1) "
                     f"of an earlier study tiny-space that sqlite:///{out / 'study.db'} does not have; delete that "
                     "folder to start the study over")
    assert not (out / "study.db").exists()
    shutil.rmtree(out / "trials" / "tiny-space")
    search(tmp_path, tiny_csv, space=GOOD_SPACE)
    assert [r["state"] for r in read_trials(out)] == ["COMPLETE", "COMPLETE"]


def test_a_study_another_search_has_just_created_is_refused_if_its_configuration_differs(tmp_path, tiny_csv,
                                                                                         stand_in_fit, monkeypatch,
                                                                                         capfd):
    """Between creating a study and writing its base configuration, another search may load it: that search waits
    for the configuration, rather than taking the study over with its own."""
    out = tmp_path / "out"
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.create_study(study_name="tiny-space", storage=storage, direction="maximize")

    def the_creator_writes_its_configuration():
        time.sleep(0.5)
        study.set_user_attr(tune.SEARCHED_ATTR, ["model.lr", "model.dropout"])
        study.set_user_attr(tune.BASE_CONFIG_ATTR, "the digest of another base configuration")

    creator = threading.Thread(target=the_creator_writes_its_configuration)
    load_study = optuna.load_study

    def load_while_the_creator_is_between_its_two_writes(**kwargs):
        loaded = load_study(**kwargs)
        creator.start()
        return loaded

    monkeypatch.setattr(optuna, "load_study", load_while_the_creator_is_between_its_two_writes)
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        search(tmp_path, tiny_csv)
    creator.join()
    assert stop.value.code == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("nlprnn.tune: error:")]
    assert errors == [f"nlprnn.tune: error: study tiny-space in {storage} was run with another base configuration "
                      "(--config and fit flags); give this search another --study_name, or run it with the "
                      "study's own configuration"]
    assert study.trials == [] and not (out / "trials").exists()


def test_a_refused_search_leaves_the_study_another_search_made_while_it_waited(tmp_path, tiny_csv, stand_in_fit,
                                                                               capfd):
    """The database is not this search's to delete when another process made it while this one waited."""
    out = tmp_path / "out"
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}"
    lock = FileLock(str(out / "study.db.lock"), thread_local=False)  # released by the thread below
    lock.acquire()

    def the_other_search_creates_its_study():
        time.sleep(1)  # while the search below waits for the lock
        study = optuna.create_study(study_name="tiny-space", storage=storage, direction="maximize")
        study.set_user_attr(tune.SEARCHED_ATTR, ["model.lr", "model.dropout"])
        study.set_user_attr(tune.BASE_CONFIG_ATTR, "the digest of another base configuration")
        lock.release()

    other = threading.Thread(target=the_other_search_creates_its_study)
    other.start()
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        search(tmp_path, tiny_csv)
    other.join()
    assert stop.value.code == 2
    assert "was run with another base configuration" in capfd.readouterr().err
    loaded = optuna.load_study(study_name="tiny-space", storage=storage)
    assert loaded.user_attrs[tune.BASE_CONFIG_ATTR] == "the digest of another base configuration"
    assert sorted(p.name for p in out.iterdir()) == ["study.db", "study.db.lock"]


def test_an_in_memory_storage_is_refused(tmp_path, tiny_csv, capfd):
    with pytest.raises(SystemExit) as stop:
        search(tmp_path, tiny_csv, "--storage", "sqlite://")
    assert stop.value.code == 2
    assert "nlprnn.tune: error: --storage sqlite:// is a database in memory" in capfd.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where, message", [
    ("a-file", "cannot be a folder: {tmp}/a-file is a file"),
    ("a-file/sub", "cannot be a folder: {tmp}/a-file is a file"),
])
def test_an_output_folder_that_cannot_be_is_refused_before_the_storage_is_touched(tmp_path, tiny_csv, capfd,
                                                                                  where, message):
    (tmp_path / "a-file").write_text("not a folder")
    storage = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with pytest.raises(SystemExit) as stop:
        search(tmp_path, tiny_csv, "--storage", storage, "--output_dir", str(tmp_path / where))
    assert stop.value.code == 2
    assert message.format(tmp=tmp_path) in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "space.yaml", "tiny.csv"]


def test_an_output_folder_whose_name_would_change_the_database_url_is_refused(tmp_path, tiny_csv, capfd):
    with pytest.raises(SystemExit) as stop:
        search(tmp_path, tiny_csv, "--output_dir", str(tmp_path / "a?b"))
    assert stop.value.code == 2
    assert "holds ?, # or %, which would change the meaning of its study database's URL" in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml", "tiny.csv"]


def test_a_space_file_that_is_not_text_is_one_line(tmp_path, tiny_csv, capfd):
    (tmp_path / "space.yaml").write_bytes(b"model.lr: \xff\xfe\n")
    with pytest.raises(SystemExit) as stop:
        tune.main(["--space", str(tmp_path / "space.yaml"), "--data.train_file", str(tiny_csv), *TINY])
    assert stop.value.code == 2
    assert f"nlprnn.tune: error: cannot read the search space {tmp_path / 'space.yaml'}" in capfd.readouterr().err


def test_without_optuna_the_command_says_what_to_install(tmp_path, tiny_csv, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(SystemExit) as stop:
        search(tmp_path, tiny_csv)
    assert stop.value.code == 2
    assert 'nlprnn.tune needs Optuna, which is not installed: pip install "nlprnn[tune]"' in capfd.readouterr().err
    assert not (tmp_path / "out").exists()
