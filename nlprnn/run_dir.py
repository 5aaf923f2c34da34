"""The run folder: checkpoints/<run-name>/ with checkpoints, tokenizer, labels, config and metrics."""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nlprnn.errors import UserError

# Set by the launching process so that the processes it starts for other devices use its folder.
RUN_NAME_ENV = "NLPRNN_RUN_NAME"
CLAIM_FILE = ".claimed"  # made first in a new run folder, by one run only; locked while a process trains in it
_held: dict[Path, int] = {}  # run folder -> the open claim file whose lock this process holds


@contextmanager
def releasing_run_dirs() -> Iterator[None]:
    """The run folders this process locked (hold) are released when the run ends: the process may run fit again."""
    try:
        yield
    finally:
        for descriptor in _held.values():
            os.close(descriptor)
        _held.clear()


def hold(run_dir: Path) -> None:
    """Lock the run folder for this process until its run ends: a second process training there is refused."""
    if sys.platform == "win32":  # no flock: the claim file still guards new runs
        return
    import fcntl

    descriptor = os.open(run_dir / CLAIM_FILE, os.O_CREAT | os.O_RDWR, 0o644)  # a resumed older run may lack it
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise UserError(f"another process is training in {run_dir} now; let it end, or stop it first") from None
    _held[run_dir] = descriptor


@contextmanager
def run_name_handover() -> Iterator[None]:
    """RUN_NAME_ENV as it was before the run, once the run ends: the processes a run starts inherit its name,
    the next run of the same process (a notebook, a script calling fit twice) does not."""
    before = os.environ.get(RUN_NAME_ENV)
    try:
        yield
    finally:
        os.environ.pop(RUN_NAME_ENV, None)
        if before is not None:
            os.environ[RUN_NAME_ENV] = before


def dataset_stem(dataset: str) -> str:
    """A dataset name or file as part of a folder name: movie-snippets, reviews (reviews.csv), imdb (stanfordnlp/imdb)."""
    stem = Path(dataset).stem if os.sep in dataset or "." in dataset else dataset
    return stem.replace("/", "--")


def new_run_name(dataset_stem: str) -> str:
    """Unique per run and sortable by start time, e.g. 20261122-101530-movie-snippets-3f9a."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{dataset_stem}-{secrets.token_hex(2)}"


def claim_run_dir(root: Path, run_name: str, resuming: bool) -> Path:
    """The folder for this run, created empty, or the existing one when resuming."""
    run_dir = root / run_name
    if resuming:
        if not run_dir.is_dir():
            raise UserError(f"cannot resume: there is no run folder {run_dir}")
        if not os.access(run_dir, os.W_OK | os.X_OK):  # before any of it is read, trained or half-written
            raise UserError(f"cannot resume: the run folder {run_dir} is not writable")
        hold(run_dir)
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder; choose another --run_name")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / "last.ckpt").exists():  # it stopped before its first checkpoint: nothing to resume
            raise UserError(f"{run_dir} already holds a run that saved no checkpoint; choose another --run_name, or "
                            "delete that folder")
        config = run_dir / "config.yaml"
        how = f"python -m nlprnn.fit --config {config} --ckpt_path last" if config.exists() else "--ckpt_path last"
        raise UserError(f"{run_dir} already holds a run; choose another --run_name, or resume it with {how}")
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where a folder of the path should be
        raise UserError(f"--output_dir {root} is not a folder (a file is in its way); name a folder") from None
    except OSError as err:
        raise UserError(f"cannot create the run folder {run_dir}: {err.strerror}") from None
    try:
        run_dir.mkdir(exist_ok=True)  # it may have been made empty beforehand
        # atomic: of two runs started at once with one --run_name, one creates the claim and the other is refused
        os.close(os.open(run_dir / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise UserError(f"another run has just claimed {run_dir}; choose another --run_name") from None
    except OSError as err:
        raise UserError(f"cannot create the run folder {run_dir}: {err.strerror}") from None
    hold(run_dir)
    return run_dir

