"""python -m nlprnn.tune: search nlprnn.fit's own configuration with Optuna, selecting on validation accuracy.

    python -m nlprnn.tune --space configs/search/default.yaml [--config configs/default.yaml] [fit's dotted flags]
        [--n_trials 40] [--timeout_min 30] [--study_name NAME] [--storage URL] [--output_dir DIR]

Each trial samples the space (TPE, seeded), trains in this process as `nlprnn.fit` would with the base
configuration + the given flags + the sampled values, and never tests: the objective is the best validation
accuracy of the run, and a MedianPruner stops trials whose validation curve falls below the median of the
finished ones. The study lives in a database (SQLite in the output folder unless --storage says otherwise):
running the same command again resumes it, and several processes (or machines, with a shared PostgreSQL
URL) can work on one study at once. After every trial the output folder gets best.yaml (the full fit
configuration of the best trial: `python -m nlprnn.fit --config <output>/best.yaml` trains and tests it),
trials.csv and two plots.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from nlprnn.errors import ReportedError, UserError, exit_on_reported_error
from nlprnn.atomic import write_bytes, write_text
from nlprnn.run_dir import RUN_NAME_ENV, dataset_stem
from nlprnn.tune_space import Dimension, fit_args, load_space, one_line

PROG = "nlprnn.tune"
DEFAULT_N_TRIALS = 20
HEARTBEAT_S = 60  # a trial whose process died (kill -9, power loss) is marked failed after GRACE_S without a beat
GRACE_S = 180
INTERRUPTED_ATTR = "interrupted"  # a trial's user attribute: stopped from outside, so no result
MAX_FAILED_IN_A_ROW = 3  # trials of one process failing one after another, with none completed, stop the search
# nlprnn.tune names every trial's run folder (--output_dir is tune's own flag); a fit setting of these is refused.
TRIAL_OWNED = ("run_name", "ckpt_path")
SET_PER_TRIAL = (*TRIAL_OWNED, "output_dir", "trainer.devices")  # by Search.trial_args
# Study user attributes: a digest of the base configuration, and the parameters left out of it (the searched ones).
BASE_CONFIG_ATTR, SEARCHED_ATTR = "base_config_sha256", "searched"
# Left out of that digest too: set per trial by nlprnn.tune, or loading parallelism, which may differ per machine.
NOT_COMPARED = ("run_name", "ckpt_path", "output_dir", "trainer.devices", "data.num_workers", "data.num_proc")
# How long a search waits for the process that created a study to write its base configuration.
CLAIM_WAIT_S = 10


class TrialInterrupted(Exception):
    """A trial was stopped from outside (Ctrl-C, SIGTERM): the search stops, and resumes when rerun."""

    def __init__(self, exit_status: int) -> None:
        super().__init__(exit_status)
        self.exit_status = exit_status


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}", allow_abbrev=False,
        description="Search nlprnn.fit's configuration with Optuna; select on validation accuracy.",
        epilog="Every other flag goes to nlprnn.fit, as the base configuration of all trials: --config FILE "
               "(default configs/default.yaml) and dotted overrides such as --data.dataset trec6.",
    )
    parser.add_argument("--space", required=True, help="Search space YAML: fit parameter paths -> distributions.")
    parser.add_argument("--n_trials", type=int, default=None,
                        help=f"Stop when the study holds this many finished trials, counted across resumes and "
                             f"processes (default {DEFAULT_N_TRIALS}, or no limit with --timeout_min).")
    parser.add_argument("--timeout_min", type=float, default=None,
                        help="Start no new trial after this many minutes of this process.")
    parser.add_argument("--study_name", default=None, help="Default: <dataset>-<space file name>.")
    parser.add_argument("--storage", default=None,
                        help="Database URL of the study (default sqlite:///<output_dir>/study.db); "
                             "e.g. postgresql://user:password@host/db to share it between machines.")
    parser.add_argument("--output_dir", default=None, help="Default: checkpoints/tune/<study_name>.")
    parser.add_argument("--seed", type=int, default=42,
                        help="Seed of the TPE sampler (plus the study's trial count at start); give each of several "
                             "processes started together its own.")
    parser.add_argument("--pruner", choices=("median", "none"), default="median",
                        help="Stop trials whose validation accuracy falls below the median of finished trials.")
    parser.add_argument("--pruner_startup_trials", type=int, default=5,
                        help="Prune nothing until the study has this many completed trials.")
    parser.add_argument("--pruner_warmup_epochs", type=int, default=2,
                        help="Prune a trial only from this epoch (validation round) on.")
    options, rest = parser.parse_known_args(argv)
    for name in ("n_trials", "timeout_min"):
        value = getattr(options, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name} must be a positive number, not {value}")
    for name in ("pruner_startup_trials", "pruner_warmup_epochs"):
        value = getattr(options, name)
        if value < 0:
            raise UserError(f"--{name} must be 0 or more, not {value}")
    if options.n_trials is None and options.timeout_min is None:
        options.n_trials = DEFAULT_N_TRIALS
    return options, rest


# --- fit's configuration ------------------------------------------------------------------------


class FitConfigs:
    """nlprnn.fit's parser, to check and write fit configurations without building anything."""

    def __init__(self, args: list[str]) -> None:
        from nlprnn.data.datamodule import TextDataModule
        from nlprnn.fit import FitCLI, with_default_config
        from nlprnn.models.classifier import TextClassifier

        class ParseOnly(FitCLI):
            def before_instantiate_classes(self) -> None:
                pass

            def instantiate_classes(self) -> None:
                pass

        self.args = with_default_config(list(args))
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            with quiet_seed_message():
                cli = ParseOnly(TextClassifier, TextDataModule, run=False, args=self.args, seed_everything_default=42,
                                save_config_callback=None, auto_configure_optimizers=False,
                                parser_kwargs={"exit_on_error": False})
        except Exception as err:  # jsonargparse's ArgumentError, or a config file that does not exist
            raise UserError(f"the fit configuration does not parse: {one_line(err)}") from None
        self.parser, self.config = cli.parser, cli.config
        owned = [f"{name} ({self.config[name]})" for name in TRIAL_OWNED if self.config[name] is not None]
        if owned:
            raise UserError(f"the fit configuration sets {', '.join(owned)}; nlprnn.tune names each trial's run "
                            "folder itself (under --output_dir)")

    def parse(self, extra: list[str]):
        return self.parser.parse_args([*self.args, *extra])

    def check_space(self, space: list[Dimension], source: str) -> None:
        """Every path must be a fit parameter, once, and every choice and range end a value fit accepts there."""
        seen: dict[str, str] = {}
        for dim in space:
            key = dim.path.replace(".init_args.", ".")  # init_args may be left out
            if key in seen:
                raise UserError(f"search space {source}: {dim.path} is listed twice"
                                + (f" (also as {seen[key]})" if seen[key] != dim.path else "") + "; list it once")
            seen[key] = dim.path
            if dim.path in SET_PER_TRIAL:
                raise UserError(f"search space {source}: {dim.path} cannot be searched: nlprnn.tune sets it for "
                                "each trial")
            if dim.path in ("model.linear_blend", "model.linear_c"):
                raise UserError(f"search space {source}: {dim.path} cannot be searched: trials are compared on the "
                                "network's own validation accuracy, which the linear model does not change; set it in "
                                "the recipe")
            for value in dim.extremes():
                try:
                    self.parse(fit_args({dim.path: value}))
                except Exception as err:
                    leaf = dim.path.rsplit(".", 1)[-1]
                    if "unrecognized arguments" in str(err) or f"Option '{leaf}' is not accepted" in str(err):
                        raise UserError(f"search space {source}: {dim.path} is not a parameter of nlprnn.fit "
                                        "(`python -m nlprnn.fit --help` lists them; `--model.encoder.help RNNEncoder` the encoder's)") from None
                    raise UserError(f"search space {source}: {dim.path} cannot be {value!r}: {one_line(err)}") from None

    def check_data(self) -> None:
        """Prepare the base configuration's data (cached for the trials): bad input fails here, not in trial 0."""
        from jsonargparse import ArgumentParser

        from nlprnn.data.datamodule import TextDataModule

        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(TextDataModule, "data")
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
        data = instantiate(parser.parse_object({"data": self.config.data.as_dict()})).data
        data.prepare()  # raises UserError on bad input

    def dump(self, extra: list[str]) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jsonargparse deprecates skip_none; fit.py writes config.yaml alike
            return self.parser.dump(self.parse(extra), skip_none=False)

    def base_digest(self, searched: list[str]) -> str:
        """A digest of the configuration every trial starts from, without the searched parameters (each trial
        sets its own) and NOT_COMPARED: equal digests mean trials of one study are comparable."""
        import yaml

        config = yaml.safe_load(self.dump([]))
        for path in [*searched, *NOT_COMPARED]:
            drop_parameter(config, path)
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def drop_parameter(config: dict, path: str) -> None:
    """Remove a dotted parameter from a dumped configuration; fit accepts model.encoder.hidden_size for
    model.encoder.init_args.hidden_size, so a key missing at one level is looked for in its init_args."""
    def level(node, key: str):
        if isinstance(node, dict) and key not in node and isinstance(node.get("init_args"), dict):
            return node["init_args"]
        return node

    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = level(node, key)
        node = node.get(key) if isinstance(node, dict) else None
    node = level(node, leaf)
    if isinstance(node, dict):
        node.pop(leaf, None)


@contextmanager
def quiet_seed_message() -> Iterator[None]:
    import logging

    logger = logging.getLogger("lightning.fabric.utilities.seed")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- storage --------------------------------------------------------------------------------------


def open_storage(url: str, prepare):
    """prepare(storage) on the study database, and its result; a URL that cannot be used, or a UserError from
    prepare, leaves nothing behind. With SQLite, processes started together prepare one at a time."""
    from filelock import FileLock
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise UserError(f"--storage {url!r} is not a database URL (e.g. sqlite:///path/study.db or "
                        "postgresql://user:password@host/db)") from None
    database: Path | None = None
    made: list[Path] = []  # folders and the lock file this process made, to take away if it leaves no study
    engine_kwargs = {}
    creating = nullcontext()
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise UserError(f"--storage {url} is a database in memory: a search there could neither resume nor be "
                            "shared; name a file, e.g. sqlite:///study.db")
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several processes share the file: wait for its lock
        database = Path(parsed.database)
        made = make_parents(database, url)
        lock = database.with_name(database.name + ".lock")
        made += [] if lock.exists() else [lock]
        creating = FileLock(str(lock), timeout=120)  # processes started together would race to create the tables
    elif parsed.get_backend_name().startswith("postgres"):
        engine_kwargs = {"connect_args": {"connect_timeout": 15}}
    try:
        with creating:  # held while preparing too: one process creates the study, the others then load it
            # decided under the lock: a database that exists now was made by another process, and stays
            new_database = database is not None and not database.exists()
            try:
                return prepare(open_rdb(url, engine_kwargs))
            except UserError:
                if new_database:
                    database.unlink(missing_ok=True)
                raise
    except (UserError, TimeoutError) as err:
        if database is None or not database.exists():  # no study lives there: nothing another process uses
            for path in reversed(made):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        if isinstance(err, UserError):
            raise
        raise UserError(f"cannot open the study storage {url}: {one_line(err)}") from None


def open_rdb(url: str, engine_kwargs: dict):
    """Optuna's storage on a database URL; one line where the URL cannot be used."""
    import optuna
    import sqlalchemy

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                              heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except (ImportError, sqlalchemy.exc.SQLAlchemyError, ValueError, OSError) as err:
        if isinstance(err, ImportError):
            reason = f"its database driver is not installed ({one_line(err.__cause__ or err)})"
        else:
            reason = one_line(err).split(" (Background on this error")[0]
        raise UserError(f"cannot open the study storage {url}: {reason}") from None


def check_output_dir(path: Path) -> None:
    """--output_dir must be a folder, or one this process can make: checked before the study storage is touched."""
    for existing in (p for p in [path, *path.parents] if p.exists()):
        if not existing.is_dir():
            raise UserError(f"--output_dir {path} cannot be a folder: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"--output_dir {path} cannot be written: {existing} is not writable")
        return


def make_parents(database: Path, url: str) -> list[Path]:
    """Create the SQLite file's missing folders; return those this process made, to undo on failure."""
    made = []
    try:
        for path in [p for p in [database.parent, *database.parent.parents] if not p.exists()][::-1]:
            try:
                path.mkdir()
            except FileExistsError:  # another process made it just now: it is not ours to take away
                continue
            made.append(path)
    except OSError as err:
        for path in reversed(made):
            shutil.rmtree(path, ignore_errors=True)
        raise UserError(f"cannot open the study storage {url}: {err.strerror}: {err.filename}") from None
    return made


# --- trials ---------------------------------------------------------------------------------------


def pruning_callback(trial):
    from lightning.pytorch.callbacks import Callback

    from nlprnn.callbacks.selection import selection_metrics

    class ReportToTrial(Callback):
        """Reports the validation accuracy the best checkpoint follows (val_acc, or with a linear blend the network's
        own, val_network_acc) to the trial after each validation round; stops training when Optuna prunes it."""

        def __init__(self) -> None:
            self.rounds = 0
            self.pruned_at: int | None = None

        def on_validation_end(self, trainer, pl_module) -> None:
            monitor = selection_metrics(pl_module)[0]  # the trial's value is its best
            value = trainer.callback_metrics.get(monitor)
            if trainer.sanity_checking or value is None:
                return
            self.rounds += 1  # 1, 2, ...: the epoch, with one validation per epoch
            trial.report(float(value), step=self.rounds)
            if trial.should_prune():
                self.pruned_at = self.rounds
                trainer.should_stop = True  # ends fit cleanly after this epoch; the objective then raises TrialPruned

    return ReportToTrial()


@contextmanager
def trial_environment(study_name: str) -> Iterator[None]:
    """One W&B run per trial in the study's group; fit's run-name hand-over to DDP workers is not inherited."""
    from nlprnn.tracking import WANDB_GROUP_ENV

    saved = {name: os.environ.pop(name, None) for name in (RUN_NAME_ENV, WANDB_GROUP_ENV)}
    os.environ[WANDB_GROUP_ENV] = study_name
    failed = True
    try:
        yield
        failed = False
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


class Search:
    def __init__(self, options: argparse.Namespace, fit_flags: list[str]) -> None:
        self.options = options
        self.space = load_space(options.space)
        self.configs = FitConfigs(fit_flags)
        self.configs.check_space(self.space, options.space)
        config = self.configs.config
        dataset = dataset_stem(config.data.train_file or config.data.dataset)
        self.study_name = options.study_name or f"{dataset}-{Path(options.space).stem}"
        self.output_dir = Path(options.output_dir or Path("checkpoints") / "tune" / self.study_name)
        check_output_dir(self.output_dir)
        if options.storage is None and set("?#%") & set(str(self.output_dir)):
            raise UserError(f"--output_dir {self.output_dir} holds ?, # or %, which would change the meaning of its "
                            "study database's URL; choose another folder, or give --storage")
        self.storage_url = options.storage or f"sqlite:///{self.output_dir / 'study.db'}"
        # per study: a new study (another name, or the same after its database was deleted) starts no old trial folder
        self.trials_dir = self.output_dir / "trials" / self.study_name
        self.fit_flags = fit_flags
        self.configs.check_data()

    def trial_args(self, trial_number: int, params: dict) -> list[str]:
        return [*self.fit_flags, *fit_args(params), "--output_dir", str(self.trials_dir),
                "--run_name", f"trial-{trial_number}",
                "--trainer.devices", "1"]  # one device per trial: several devices would re-run this command

    def objective(self, trial) -> float:
        import optuna

        from nlprnn import fit
        from nlprnn.callbacks.nonfinite import NonFiniteLoss

        params = {dim.path: dim.suggest(trial) for dim in self.space}
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        report = pruning_callback(trial)
        try:
            with trial_environment(self.study_name):
                result = fit.run(self.trial_args(trial.number, params), callbacks=[report], test=False,
                                 resume_hint=False)  # a stopped trial resumes with the search, not on its own
        except NonFiniteLoss as err:
            trial.set_user_attr("error", str(err).split(";")[0])
            raise
        except UserError as err:  # e.g. a sampled combination the model refuses: this trial fails, the search goes on
            trial.set_user_attr("error", one_line(err))
            raise
        except SystemExit as stop:  # Lightning ends the process on Ctrl-C; fit on SIGTERM
            status = stop.code if isinstance(stop.code, int) else 1
            self.retry_later(trial, params)
            raise TrialInterrupted(130 if isinstance(stop.__context__, KeyboardInterrupt) else status) from None
        except KeyboardInterrupt:
            self.retry_later(trial, params)
            raise TrialInterrupted(130) from None
        if report.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at epoch {report.pruned_at}")
        value = result["best_val_acc"]
        if math.isnan(value):
            trial.set_user_attr("error", "no validation accuracy (did validation run?)")
        return value

    @staticmethod
    def retry_later(trial, params: dict) -> None:
        """An interrupted trial is no result: it counts toward no budget, and the resumed search runs it again."""
        trial.set_user_attr(INTERRUPTED_ATTR, True)
        trial.set_user_attr("error", "interrupted; run again when the search resumes")
        trial.study.enqueue_trial(params)

    @staticmethod
    def finished_trials(study) -> int:
        """Trials that count toward --n_trials, across processes: ended by themselves, not interrupted."""
        from optuna.trial import TrialState

        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
        return sum(not t.user_attrs.get(INTERRUPTED_ATTR) for t in finished)

    def run(self) -> None:
        import optuna

        from nlprnn.callbacks.nonfinite import NonFiniteLoss

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # one progress line per trial instead (see progress)
        study = open_storage(self.storage_url, self.open_study)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        study.sampler = optuna.samplers.TPESampler(seed=self.options.seed + len(study.trials), constant_liar=True)
        self.started, self.failed_in_a_row = time.monotonic(), 0
        n_trials, timeout_min = self.options.n_trials, self.options.timeout_min
        done = self.finished_trials(study)
        print(f"{PROG}: study {self.study_name} in {self.storage_url} ({done} finished trials); "
              f"trials in {self.trials_dir}", flush=True)
        if n_trials is not None and done >= n_trials:
            print(f"{PROG}: the study already holds {done} finished trials (--n_trials {n_trials}); nothing to run",
                  flush=True)
        else:
            try:
                study.optimize(self.objective, timeout=timeout_min * 60 if timeout_min else None,
                               callbacks=[self.progress], catch=(NonFiniteLoss, UserError), gc_after_trial=True)
            except TrialInterrupted as stop:
                self.write_outputs(study)
                print(f"{PROG}: stopped; run the same command again to resume study {self.study_name}",
                      file=sys.stderr, flush=True)
                raise SystemExit(stop.exit_status) from None
        self.write_outputs(study)
        self.summary(study)

    def open_study(self, storage):
        """Load the study, or create it with this search's base configuration; a study this search does not fit is
        refused before anything is written to it."""
        import optuna

        pruner = (optuna.pruners.MedianPruner(n_startup_trials=self.options.pruner_startup_trials,
                                              n_warmup_steps=self.options.pruner_warmup_epochs)
                  if self.options.pruner == "median" else optuna.pruners.NopPruner())
        # listed before the study is read: a trial is stored before fit makes its folder, so none of these is new
        folders = [p.name for p in self.trials_dir.glob("trial-*") if p.is_dir() and any(p.iterdir())]
        created = False
        try:
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=pruner)
        except KeyError:
            self.refuse_old_folders(folders, started=[])
            try:  # the database lets one process create a study of this name: that one writes its configuration
                study = optuna.create_study(study_name=self.study_name, storage=storage, direction="maximize",
                                            pruner=pruner)
                created = True
            except optuna.exceptions.DuplicatedStudyError:  # another process made it in between
                study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=pruner)
        trials = study.get_trials(deepcopy=False)
        self.check_space(trials)
        self.refuse_old_folders(folders, started=[t for t in trials if t.datetime_start is not None])
        searched = [dim.path for dim in self.space]
        if not created and not trials:
            self.wait_for_base_config(study)
        if BASE_CONFIG_ATTR not in study.user_attrs:  # new, or made outside nlprnn.tune: it takes this configuration
            study.set_user_attr(SEARCHED_ATTR, searched)
            study.set_user_attr(BASE_CONFIG_ATTR, self.configs.base_digest(searched))
        # compared without the study's own searched parameters: a dimension added to or dropped from the space
        # keeps the trials comparable (they ran, and best.yaml writes them, with the base value or their own)
        elif study.user_attrs[BASE_CONFIG_ATTR] != self.configs.base_digest(study.user_attrs[SEARCHED_ATTR]):
            raise UserError(f"study {self.study_name} in {self.storage_url} was run with another base configuration "
                            "(--config and fit flags); give this search another --study_name, or run it with the "
                            "study's own configuration")
        return study

    def wait_for_base_config(self, study) -> None:
        """A study without trials may have just been created by another process, which writes its base
        configuration next: wait for it, so that a search with another configuration is refused rather than
        taking the study over. A study made outside nlprnn.tune never gets one, and is taken after the wait."""
        deadline = time.monotonic() + CLAIM_WAIT_S
        while BASE_CONFIG_ATTR not in study.user_attrs and time.monotonic() < deadline:
            time.sleep(0.2)

    def check_space(self, trials) -> None:
        """Optuna cannot change a parameter's kind, log scale or categorical choices within a study."""
        from optuna.distributions import check_distribution_compatibility

        for dim in self.space:
            new = dim.distribution()
            old = next((t.distributions[dim.path] for t in trials if dim.path in t.distributions), None)
            if old is None:
                continue
            try:
                check_distribution_compatibility(old, new)
            except ValueError:
                raise UserError(f"search space {self.options.space}: {dim.path} is {describe(new)}, but study "
                                f"{self.study_name} sampled it as {describe(old)}; give this search another "
                                "--study_name") from None

    def refuse_old_folders(self, folders: list[str], started: list) -> None:
        """Trial folders no started trial of this study made (its database was deleted): fit would refuse them."""
        ours = {f"trial-{t.number}" for t in started}
        old = sorted((name for name in folders if name not in ours), key=lambda name: (len(name), name))
        if old:
            shown = ", ".join(old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
            raise UserError(f"{self.trials_dir} holds trial folders ({shown}) of an earlier study {self.study_name} "
                            f"that {self.storage_url} does not have; delete that folder to start the study over")

    # --- reporting -------------------------------------------------------------------------------

    def progress(self, study, trial) -> None:
        """After each trial of this process: one line, and the outputs brought up to date."""
        from optuna.trial import TrialState

        if trial.state == TrialState.COMPLETE:
            outcome = f"validation accuracy {trial.value:.4f}"
        elif trial.state == TrialState.PRUNED:
            outcome = f"pruned at epoch {trial.last_step}"
        else:
            outcome = f"failed ({trial.user_attrs.get('error', 'see the log above')})"
        line = f"trial {trial.number}: {outcome}"
        best = best_trial(study)
        if best is not None:
            line += f" | best {best.value:.4f} (trial {best.number})"
        left = []
        done = self.finished_trials(study)
        if self.options.n_trials is not None:
            left.append(f"{max(self.options.n_trials - done, 0)} of {self.options.n_trials} trials left")
        if self.options.timeout_min is not None:
            minutes = self.options.timeout_min - (time.monotonic() - self.started) / 60
            left.append(f"{max(minutes, 0):.1f} min left")
        print(f"{PROG}: {line} | {', '.join(left)}", flush=True)
        self.write_outputs(study)
        self.failed_in_a_row = self.failed_in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.failed_in_a_row == MAX_FAILED_IN_A_ROW and best is None:
            # a mistake every trial makes (not one sampled value) would otherwise fail trial after trial
            print(f"{PROG}: {MAX_FAILED_IN_A_ROW} trials in a row failed and none has completed; the search stops",
                  file=sys.stderr, flush=True)
            study.stop()
        if self.options.n_trials is not None and done >= self.options.n_trials:
            study.stop()  # counted across processes, as each of them ends a trial

    def write_outputs(self, study) -> None:
        """best.yaml, trials.csv and the plots, each replaced atomically."""
        write_text(self.output_dir / "trials.csv", trials_table(study))
        best = best_trial(study)
        if best is not None:
            header = (f"# nlprnn.tune study {self.study_name}: trial {best.number}, best validation accuracy {best.value:.4f}\n"
                      f"# train and test it: python -m nlprnn.fit --config {self.output_dir / 'best.yaml'}\n")
            write_text(self.output_dir / "best.yaml", header + self.configs.dump(fit_args(best.params)))
        self.plot_notes = write_plots(study, self.output_dir)

    def summary(self, study) -> None:
        best = best_trial(study)
        for note in self.plot_notes:
            print(f"{PROG}: {note}", flush=True)
        if best is None:
            raise ReportedError(f"no trial completed; trials.csv in {self.output_dir} lists what happened")
        params = ", ".join(f"{path}={value!r}" for path, value in best.params.items())
        print(f"{PROG}: best validation accuracy {best.value:.4f} (trial {best.number} of {len(study.trials)}): {params}\n"
              f"{PROG}: results in {self.output_dir} (best.yaml, trials.csv, plots); train and test the best with:\n"
              f"  python -m nlprnn.fit --config {self.output_dir / 'best.yaml'}", flush=True)


def describe(distribution) -> str:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return f"categorical {list(distribution.choices)}"
    kind = "int" if isinstance(distribution, IntDistribution) else "float"
    return f"{kind} {distribution.low}..{distribution.high}{' (log)' if distribution.log else ''}"


def best_trial(study):
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def trials_table(study) -> str:
    trials = study.get_trials(deepcopy=False)
    params = list(dict.fromkeys(path for t in trials for path in t.params))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", "value", "epochs", "duration_s", "worker", *params, "error"])
    for t in trials:
        duration = t.duration.total_seconds() if t.duration is not None else None
        writer.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                         "" if t.last_step is None else t.last_step,
                         "" if duration is None else round(duration, 1), t.user_attrs.get("worker", ""),
                         *[t.params.get(p, "") for p in params], t.user_attrs.get("error", "")])
    return out.getvalue()


def write_plots(study, output_dir: Path) -> list[str]:
    """optimization_history.png and param_importances.png; returns notes on what could not be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots


    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    notes = []
    for name, plot, needed in (("optimization_history.png", plots.plot_optimization_history, 1),
                               ("param_importances.png", plots.plot_param_importances, 2)):
        if len(completed) < needed:
            notes.append(f"{name} not drawn: it needs {needed} completed trial{'s' if needed > 1 else ''}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna's matplotlib plots are "experimental"
                ax = plot(study)
            figure = ax.figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            png = io.BytesIO()
            figure.savefig(png, format="png", dpi=100)
            plt.close(figure)
            write_bytes(output_dir / name, png.getvalue())
        except (ValueError, RuntimeError, optuna.exceptions.OptunaError) as err:  # e.g. no parameter varies
            notes.append(f"{name} not drawn: {one_line(err)}")
    return notes


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    with exit_on_reported_error(PROG):
        try:
            import optuna  # noqa: F401  (before anything is prepared)
        except ImportError:
            raise UserError('nlprnn.tune needs Optuna, which is not installed: pip install "nlprnn[tune]"') from None
        options, fit_flags = parse_args(argv)
        search = Search(options, fit_flags)  # checks everything; writes nothing
        search.run()


if __name__ == "__main__":
    main()
