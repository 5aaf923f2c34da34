"""Streaming, resumable batch scoring: a file or a folder of parts in, a folder of parts out.

The input is cut into parts of `rows_per_part` consecutive rows; part k of the output, `part-0000k.<ext>`,
holds input rows [k * rows_per_part, (k + 1) * rows_per_part) in order, with every input column, the
predicted label and each label's probability. A part is written atomically and then recorded as done in
`_parts/part-0000k.json`, so a kill at any moment leaves whole parts only, and the same command run again
skips the recorded parts and scores the rest: every row ends up in the output exactly once. `_job.json`
pins what the output is made of (bundle, input files, text column, part size, format), so that a rerun
over changed input or with another bundle is refused instead of mixing two jobs; `_SUCCESS` marks a
finished job and holds its counts. Readers of Parquet folders (pyarrow, pandas, Spark, DuckDB) skip the
files whose names start with `_` or `.`.

With `workers` > 1, each worker process reads the whole input and scores the parts k with
k % workers == its index: reading is cheap next to the model, and no rows travel between processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from nlprnn.atomic import replacing, write_json
from nlprnn.deploy.bundle import read_bundle
from nlprnn.errors import ReportedError, UserError
from nlprnn.threads import available_cores

if TYPE_CHECKING:
    from nlprnn.deploy.tables import InputFiles

JOB_FILE = "_job.json"
DONE_FOLDER = "_parts"
SUCCESS_FILE = "_SUCCESS"
LOCK_FILE = "_lock"
ROWS_PER_PART = 50_000  # about 6 s of work on 2 cores with the default model: what a kill can cost


class Stopped(ReportedError):
    """Ctrl-C or SIGTERM (a scheduler's preemption): the finished parts stay, and the same command continues
    (unless not `resumable`: texts printed to standard output start again from the first)."""

    def __init__(self, signum: int, resumable: bool = True) -> None:
        hint = "; run the same command again to continue from the last finished part" if resumable else ""
        super().__init__(f"stopped by {signal.Signals(signum).name}{hint}")
        self.exit_status = 128 + signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM


@dataclass(frozen=True)
class Job:
    """One scoring job: what is read, what it is scored with, and where and how it is written."""

    bundle: Path
    input: Path
    text_column: str
    output: Path
    output_format: str = "parquet"
    rows_per_part: int = ROWS_PER_PART

    def __post_init__(self) -> None:  # paths may come as strings from Python
        for name in ("bundle", "input", "output"):
            object.__setattr__(self, name, Path(getattr(self, name)))

    def part_file(self, part: int) -> Path:
        return self.output / f"part-{part:05d}.{self.output_format}"

    def done_file(self, part: int) -> Path:
        return self.output / DONE_FOLDER / f"part-{part:05d}.json"


def score_files(
    job: Job,
    workers: int = 1,
    threads: int | None = None,
    batch_size: int = 64,
    quiet: bool = False,
) -> dict:
    """Score `job.input` into `job.output`, resuming what an earlier run of the same job left; its summary.

    Progress and the summary go to standard error unless `quiet`.
    """
    from nlprnn.deploy.tables import open_input, refuse_clashing_columns, refuse_unwritable

    if workers < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, not {threads}")
    if job.rows_per_part < 1:
        raise UserError(f"--rows_per_part must be at least 1, not {job.rows_per_part}")
    progress = None if quiet else sys.stderr
    bundle = read_bundle(job.bundle)
    source = open_input(job.input, job.text_column)
    refuse_clashing_columns(bundle.labels, source.columns)
    refuse_unwritable(source.schema, source.files[0], job.output_format)
    with _locked_output(job.output):
        record = job_record(job, source, bundle.root)
        _start_or_resume(job, record)
        if (job.output / SUCCESS_FILE).exists():
            summary = json.loads((job.output / SUCCESS_FILE).read_text())
            _say(progress, f"{job.output} is already complete: {summary['rows']:,} rows in {summary['parts']} parts")
            return summary
        _remove_temporaries(job.output)
        done = frozenset(_done_parts(job))
        meter = Progress(progress, total=source.approximate_rows(), done=_rows_of(job, done))
        threads = threads or max(1, available_cores() // workers)
        started = time.monotonic()
        with _stopped_by_signals():
            if workers == 1:
                read = score_parts(job, source, 0, 1, threads, batch_size, done, meter.part_done)
            else:
                read = _score_in_processes(job, source, workers, threads, batch_size, done, meter)
        summary = _finish(job, read, time.monotonic() - started)
        meter.close()
        _say(progress, _summary_line(job, summary))
        return summary


def job_record(job: Job, source: InputFiles, bundle_folder: Path) -> dict:
    """What must not change between a run and its resumption, as JSON."""
    return {
        "format": 1,
        "bundle_sha256": _folder_sha256(bundle_folder),
        "input": [{"file": str(f.resolve()), "bytes": f.stat().st_size, "modified_ns": f.stat().st_mtime_ns}
                  for f in source.files],
        "text_column": job.text_column,
        "rows_per_part": job.rows_per_part,
        "output_format": job.output_format,
    }


def score_parts(
    job: Job,
    source: InputFiles,
    worker: int,
    workers: int,
    threads: int,
    batch_size: int,
    done: frozenset[int],
    on_part: Callable[[int, int], None],
) -> dict:
    """Score this worker's parts that are not done; how many rows the input has and how many were malformed."""
    from nlprnn.deploy.predictor import Predictor
    from nlprnn.deploy.tables import score_table, write_table

    predictor = Predictor(job.bundle, batch_size=batch_size, threads=threads)
    malformed: list[str] = []
    rows = 0
    mine = lambda part: part % workers == worker and part not in done  # noqa: E731
    for part, count, table in _parts(source.batches(malformed.append), job.rows_per_part, mine):
        rows += count
        if table is None:
            continue
        scored, counts = score_table(predictor, table, source.text_column)
        with replacing(job.part_file(part)) as f:
            write_table(scored, f, job.output_format)
        write_json(job.done_file(part), {"part": part, "first_row": part * job.rows_per_part, **asdict(counts)})
        on_part(part, counts.rows)
    return {"rows": rows, "malformed": len(malformed), "first_malformed": malformed[0] if malformed else None}


def _parts(batches: Iterator, rows_per_part: int, wanted: Callable[[int], bool]) -> Iterator[tuple]:
    """(k, rows, table) for each part k of `rows_per_part` rows; the table only where `wanted(k)`, else None."""
    part, pending, count = 0, [], 0
    for batch in batches:
        while batch.num_rows:
            take = min(batch.num_rows, rows_per_part - count)
            if wanted(part):
                pending.append(batch.slice(0, take))
            batch, count = batch.slice(take), count + take
            if count == rows_per_part:
                yield part, count, (_table(pending) if wanted(part) else None)
                part, pending, count = part + 1, [], 0
    if count:
        yield part, count, (_table(pending) if wanted(part) else None)


def _table(batches: list) -> object:
    """One table of `batches`; JSON lines may widen a column's type from one batch to the next."""
    import pyarrow as pa

    return pa.concat_tables([pa.Table.from_batches([b]) for b in batches], promote_options="permissive")


def _score_in_processes(
    job: Job, source: InputFiles, workers: int, threads: int, batch_size: int, done: frozenset[int], meter: Progress
) -> dict:
    """Run `score_parts` in `workers` spawned processes; the first failure stops them all."""
    context = multiprocessing.get_context("spawn")  # a fork would copy onnxruntime's threads in a broken state
    messages = context.SimpleQueue()
    with _environment(RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads)):  # tokenizers' pool
        processes = [context.Process(target=_worker, name=f"nlprnn-score-{w}", daemon=True,
                                     args=(job, source, w, workers, threads, batch_size, done, messages))
                     for w in range(workers)]
        for process in processes:
            process.start()
    results: dict[int, dict] = {}
    try:
        while len(results) < workers:
            if messages.empty():
                _check_alive(processes, results)
                time.sleep(0.05)
                continue
            kind, worker, payload = messages.get()
            if kind == "part":
                meter.part_done(*payload)
            elif kind == "done":
                results[worker] = payload
            else:
                raise (UserError if kind == "user-error" else ReportedError)(payload)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()  # safe at any moment: a part is either whole and recorded, or rescored
            process.join()
        _remove_temporaries(job.output)  # what a killed worker was writing; nobody writes any more
    return results[0]


def _worker(job, source, worker, workers, threads, batch_size, done, messages) -> None:
    _die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C and schedulers signal the whole group; the parent decides
        signal.signal(sig, signal.SIG_IGN)
    try:
        read = score_parts(job, source, worker, workers, threads, batch_size, done,
                           lambda part, rows: messages.put(("part", worker, (part, rows))))
        messages.put(("done", worker, read))
    except UserError as err:
        messages.put(("user-error", worker, str(err)))
    except Exception as err:  # reported to the parent, which stops the job with one line
        messages.put(("error", worker, f"worker {worker} failed: {type(err).__name__}: {err}"))


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent dies, so a killed job leaves no orphan writing parts."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the request took effect
            os._exit(1)


def _check_alive(processes: list, results: dict) -> None:
    for w, process in enumerate(processes):
        if w not in results and not process.is_alive() and process.exitcode not in (0, None):
            raise ReportedError(
                f"worker {w} stopped (exit code {process.exitcode}); run the same command again to continue"
            )


def _finish(job: Job, read: dict, seconds: float) -> dict:
    """Check that every part is recorded, sum the records, and mark the job complete."""
    parts = math.ceil(read["rows"] / job.rows_per_part)
    missing = [k for k in range(parts) if not job.done_file(k).exists()]
    if missing:  # a worker stopped early: nothing is marked complete, a rerun scores what is missing
        raise ReportedError(f"parts {missing[:5]} were not written; run the same command again to continue")
    from nlprnn.deploy.tables import Counts

    totals = Counts()
    for k in range(parts):
        record = json.loads(job.done_file(k).read_text())
        totals.add(Counts(**{key: record[key] for key in asdict(totals)}))
    summary = {**asdict(totals), "parts": parts, "malformed_skipped": read["malformed"],
               "first_malformed": read["first_malformed"], "seconds_this_run": round(seconds, 1)}
    write_json(job.output / SUCCESS_FILE, summary)
    return summary


def _summary_line(job: Job, summary: dict) -> str:
    notes = []
    if summary["empty"]:
        notes.append(f"{summary['empty']:,} with no text were left without a label")
    if summary["undecodable"]:
        notes.append(f"{summary['undecodable']:,} held bytes that are not UTF-8, replaced before scoring")
    if summary["malformed_skipped"]:
        notes.append(f"{summary['malformed_skipped']:,} malformed rows were skipped "
                     f"(the first: {summary['first_malformed']})")
    line = f"wrote {summary['rows']:,} rows in {summary['parts']} parts to {job.output}"
    return line + ("; " + "; ".join(notes) if notes else "")


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise `Stopped`, so that workers are stopped and temporary files removed on the way out."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _locked_output(output: Path) -> Iterator[None]:
    """The output folder, created if new, held by this job alone; removed again if the job fails before any part."""
    import fcntl

    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder (it will hold the parts)")
    if output.is_dir() and any(p.name != LOCK_FILE for p in output.iterdir()) and not (output / JOB_FILE).exists():
        raise UserError(f"--output {output} already holds files that are not a scoring job's; give a new folder")
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    with open(output / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another nlprnn.predict is writing to {output}; wait for it or give another folder") from None
        try:
            yield
        except BaseException:
            if created and not any((output / DONE_FOLDER).glob("part-*.json")):
                shutil.rmtree(output, ignore_errors=True)  # nothing was scored: leave no trace of the attempt
            raise


def _start_or_resume(job: Job, record: dict) -> None:
    job_file = job.output / JOB_FILE
    scored = any((job.output / DONE_FOLDER).glob("part-*.json")) or (job.output / SUCCESS_FILE).exists()
    if not job_file.exists() or not scored:  # a job that scored nothing yet (it failed, or was killed) starts anew
        for part in job.output.glob("part-*"):  # written, but killed before its record: no part of this job
            part.unlink()
        write_json(job_file, record)
        return
    started = json.loads(job_file.read_text())
    for key, what in (("bundle_sha256", "another bundle"), ("input", "other input files, or they changed since"),
                      ("text_column", f"--text_column {started.get('text_column')!r}"),
                      ("rows_per_part", f"--rows_per_part {started.get('rows_per_part')}"),
                      ("output_format", f"--output_format {started.get('output_format')}")):
        if started.get(key) != record[key]:
            raise UserError(f"{job.output} holds a job started with {what}; rerun it as it was started, "
                            "or score into a new folder")


def _done_parts(job: Job) -> Iterator[int]:
    for record in (job.output / DONE_FOLDER).glob("part-*.json"):
        part = int(record.stem.removeprefix("part-"))
        if job.part_file(part).exists():
            yield part


def _rows_of(job: Job, parts: frozenset[int]) -> int:
    return sum(json.loads(job.done_file(k).read_text())["rows"] for k in parts)


def _remove_temporaries(output: Path) -> None:
    """Files a killed run was writing (atomic writes leave them only when killed outright)."""
    for folder in (output, output / DONE_FOLDER):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _say(stream: IO[str] | None, line: str) -> None:
    if stream is not None:
        print(line, file=stream, flush=True)


class Progress:
    """Rows scored, rows/s and time left, on one line: redrawn on a terminal, every 30 s in a log."""

    def __init__(self, stream: IO[str] | None, total: int, done: int) -> None:
        self.stream, self.total, self.done, self.resumed = stream, total, done, done
        self.started = self.shown = time.monotonic()
        self.tty = bool(stream is not None and stream.isatty())
        if done:
            _say(stream, f"resuming: {done:,} rows already scored")

    def part_done(self, part: int, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self.stream is not None and now - self.shown >= (0.2 if self.tty else 30):
            self.shown = now
            self.stream.write(("\r" if self.tty else "") + self.line(now) + ("" if self.tty else "\n"))
            self.stream.flush()

    def line(self, now: float) -> str:
        rate = (self.done - self.resumed) / max(now - self.started, 1e-9)
        total = max(self.total, self.done)
        left = (total - self.done) / rate if rate > 0 else float("inf")
        return (f"scored {self.done:,} of about {total:,} rows ({self.done / max(total, 1):.0%}), "
                f"{rate:,.0f} rows/s, {_duration(left)} left")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(time.monotonic()) + "\n")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown time"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"
