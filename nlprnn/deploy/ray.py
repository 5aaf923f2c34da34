"""Batch scoring on a Ray cluster: `python -m nlprnn.deploy.ray BUNDLE --input PATH --output FOLDER`.

Rows are read with Ray Data (CSV, TSV, JSON lines or Parquet: a file or a folder of parts, on local disk, NFS,
S3 or GCS), scored by a pool of actors that each hold the bundle's onnxruntime session, and written as a
folder of parts whose names sort in input order. The columns are those of `python -m nlprnn.predict --output`
(`nlprnn.deploy.tables.score_table`): every input column, the predicted label and each label's probability,
with no label where the text is null, empty or whitespace. Needs `pip install "nlprnn[ray]"` on every machine;
the bundle itself travels with the job, so workers need no shared copy of it. See docs/cluster.md.

Why Ray Data rather than Spark: a bundle needs only onnxruntime, tokenizers and numpy, and Ray is a pure-Python
pip install (no JVM to install and tune on every machine); `map_batches` takes a stateful class, so each actor
loads the model once and keeps its session (Spark's `predict_batch_udf` can cache a model too, but needs a JVM
and converts Arrow to pandas and back around each batch); Ray Data hands batches over as Arrow tables, which
`score_table` takes as they are; and it reads and writes Parquet, CSV and JSON like Spark does.

Imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from nlprnn.deploy.bundle import BUNDLE_FILES, read_bundle
from nlprnn.errors import UserError, exit_on_reported_error, first_line

try:  # the extra: pip install "nlprnn[ray]" (ray[data] brings pyarrow)
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.fs as pa_fs
    import ray
    import ray.data
    from ray.data.datasource import FileBasedDatasource

    from nlprnn.deploy.tables import (
        FORMATS, columns_of, csv_parse_options, jsonl_batches, lenient_csv_columns, output_format_of,
        parquet_schema, refuse_clashing_columns, refuse_unwritable, score_table, stream_lines,
    )
except ImportError:  # pragma: no cover - the base install has neither; _require_ray says how to get them
    ray = None
    FileBasedDatasource = object  # JsonLines is then never made: _require_ray refuses first

if TYPE_CHECKING:
    from nlprnn.deploy.predictor import Predictor

PROG = "nlprnn.deploy.ray"
READABLE = ("csv", "tsv", "jsonl", "parquet")  # of nlprnn.predict's input formats; Ray Data reads no text lines
ROWS_PER_BATCH = 4096  # rows an actor scores per call: bounded memory, and enough to sort by length


class BundleScorer:
    """A `Dataset.map_batches` class: scores Arrow tables with a bundle loaded once, when the actor starts.

    Args:
        files: the bundle's files by name (see `bundle_files`), or a `ray.put` reference to them.
        text_column: the column holding the texts.
        threads: onnxruntime (and tokenizers) threads; give the CPUs the actor reserved, since a Predictor
            left to its default would take every core of the machine and fight the other actors there.
        batch_size: texts per model call.
    """

    def __init__(
        self, files: dict[str, bytes] | ray.ObjectRef, text_column: str, threads: int = 1, batch_size: int = 64
    ) -> None:
        from nlprnn.deploy.predictor import Predictor

        if not isinstance(files, dict):
            files = ray.get(files)
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # tokenizers' pool, read when it first starts
        with tempfile.TemporaryDirectory(prefix="nlprnn-bundle-") as folder:  # private to this actor
            for name, data in files.items():
                (Path(folder) / name).write_bytes(data)
            # Once loaded, the session and the tokenizer live in memory: the folder can go.
            self.predictor: Predictor = Predictor(folder, batch_size=batch_size, threads=threads)
        self.text_column = text_column

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.text_column not in table.column_names:
            raise UserError(f"a batch has no column {self.text_column!r} (it has {', '.join(table.column_names)})")
        return score_table(self.predictor, table, self.text_column)[0]


def bundle_files(bundle: str | Path) -> dict[str, bytes]:
    """The files of the bundle in folder `bundle`, checked, by name: what an actor needs to load it."""
    root = read_bundle(bundle).root
    return {name: (root / name).read_bytes() for name in BUNDLE_FILES}


def score_dataset(
    dataset: ray.data.Dataset,
    bundle: str | Path,
    text_column: str = "text",
    workers: int = 2,
    threads_per_worker: int = 1,
    batch_size: int = 64,
    rows_per_batch: int = ROWS_PER_BATCH,
) -> ray.data.Dataset:
    """`dataset` scored by `workers` actors of `threads_per_worker` CPUs each, in input order (lazy).

    Each row gains the predicted label and each label's probability (null where the text is null, empty or
    whitespace). The actors reserve workers x threads_per_worker CPUs; read the input with `read_input`, whose
    tasks reserve none, or leave CPUs free for your own reads, else they wait for CPUs the actors hold.
    """
    _require_ray()
    _check_counts(workers, threads_per_worker)
    files = ray.put(bundle_files(bundle))  # one copy in the object store, however many actors load it
    dataset.context.execution_options.preserve_order = True  # else a fast block may overtake a slow one
    return dataset.map_batches(
        BundleScorer,
        fn_constructor_kwargs=dict(files=files, text_column=text_column, threads=threads_per_worker,
                                   batch_size=batch_size),
        batch_format="pyarrow",
        batch_size=rows_per_batch,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads_per_worker,
    )


class SkippedRows:
    """Counts the malformed rows the read tasks skip, wherever in the cluster they run (a Ray actor)."""

    def __init__(self) -> None:
        self.count, self.example = 0, None

    def add(self, message: str) -> None:
        self.count += 1
        self.example = self.example or message

    def summary(self) -> tuple[int, str | None]:
        return self.count, self.example


def start_skipped_rows() -> ray.actor.ActorHandle:
    return ray.remote(num_cpus=0)(SkippedRows).remote()  # no CPU: the scoring actors may hold them all


def _reporter(skipped: ray.actor.ActorHandle | None) -> Callable[[str], None] | None:
    """A read task's `on_malformed`: waits for the count to take the row, so that it is in before the job ends."""
    return None if skipped is None else lambda message: ray.get(skipped.add.remote(message))


class JsonLines(FileBasedDatasource):
    """JSON lines read as `predict` reads them: a line that is not a JSON object, or whose text is not a string,
    is skipped (Ray's own JSON reader fails the job on it), and bytes that are not UTF-8 become U+FFFD."""

    def __init__(self, paths: list[str], text_column: str, skipped: ray.actor.ActorHandle | None = None,
                 **kwargs) -> None:
        super().__init__(paths, **kwargs)
        self.text_column = text_column
        self.skipped = skipped

    def _read_stream(self, f: pa.NativeFile, path: str):
        for batch in jsonl_batches(stream_lines(f), path, self.text_column, on_malformed=_reporter(self.skipped)):
            yield pa.Table.from_batches([batch])


@dataclass(frozen=True)
class Source:
    """An input checked on the driver: its files (in name order), their format and the first file's columns."""

    filesystem: pa_fs.FileSystem
    files: list[str]
    format: str
    columns: list[str]
    schema: pa.Schema | None = None  # Parquet: every file's columns, their types joined


def open_source(path: str, text_column: str) -> Source:
    """The input at `path` (a file or a folder of parts; local, or a URI such as s3://bucket/in/), checked as
    `predict` checks it; for Parquet, every file's schema (its footer, not its rows)."""
    _require_ray()
    filesystem, root = _filesystem(path)
    info = _file_info(filesystem, root, path)
    if info.type == pa_fs.FileType.NotFound:
        raise UserError(f"input not found: {path}")
    if info.type == pa_fs.FileType.Directory:
        found = filesystem.get_file_info(pa_fs.FileSelector(root))
        files = sorted(f.path for f in found if f.is_file and not f.base_name.startswith(("_", ".")))
        if not files:
            raise UserError(f"{path} holds no files to score")
    else:
        files = [root]
    formats = {FORMATS.get(PurePosixPath(f).suffix.lower()) for f in files}
    if len(formats) != 1 or not formats <= set(READABLE):
        raise UserError(f"cannot read {path}: give a .csv, .tsv, .jsonl or .parquet file, or a folder of one of them")
    fmt = formats.pop()
    columns = columns_of(files[0], fmt, filesystem)
    if text_column not in columns:
        raise UserError(f"{files[0]} has no column {text_column!r} (it has {', '.join(map(repr, columns))}); "
                        "name the text column with --text_column")
    # A task would fail on a text column of numbers, say, after other tasks had written their files.
    schema = parquet_schema(files, text_column, filesystem) if fmt == "parquet" else None
    return Source(filesystem, files, fmt, columns, schema)


def read_input(source: Source, text_column: str, skipped: ray.actor.ActorHandle | None = None) -> ray.data.Dataset:
    """The rows of `source` as a Ray dataset, in file order; CSV columns as text, so ids keep their zeros, each byte
    that is not UTF-8 a U+FFFD (the texts' are mended and counted by `score_table`), as `predict` reads them.

    A malformed row (a CSV row with the wrong number of fields, a JSON line that is not an object or whose text
    is not a string) is skipped and, given `skipped` (from `start_skipped_rows`), counted there. The read tasks
    reserve no CPU: the scoring actors hold the CPUs, and a read waiting for one of them would wait for ever
    when the actors fill the cluster.
    """
    common = dict(filesystem=source.filesystem, num_cpus=0, file_extensions=None)
    if source.format in ("csv", "tsv"):
        # Bytes, not strings: Arrow's strings fail the whole read on one byte that is not UTF-8.
        types = dict.fromkeys(source.columns, pa.binary())
        report = _reporter(skipped)
        on_malformed = None if report is None else (
            lambda row: report(f"a row of {row.actual_columns} fields, not {row.expected_columns}"))
        rows = ray.data.read_csv(source.files, parse_options=csv_parse_options(source.format, on_malformed),
                                 convert_options=pa_csv.ConvertOptions(column_types=types, strings_can_be_null=False),
                                 **common)
        # No CPU, as for the read: the actors hold the CPUs. One call per block.
        return rows.map_batches(partial(lenient_csv_columns, text_column=text_column), batch_format="pyarrow",
                                batch_size=None, zero_copy_batch=True, num_cpus=0)
    if source.format == "jsonl":
        return ray.data.read_datasource(JsonLines(source.files, text_column, skipped, filesystem=source.filesystem,
                                                  file_extensions=None), num_cpus=0)
    # Ray's newer Parquet reader (2.5x on) lists files in a task asking a whole CPU, which never comes while the
    # actors hold every CPU; the older reader honours num_cpus=0 throughout, so it is used while it exists.
    context = ray.data.DataContext.get_current()
    newer = getattr(context, "use_datasource_v2", None)
    if newer is not None:
        context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(source.files, **common)
    finally:
        if newer is not None:
            context.use_datasource_v2 = newer


def write_output(dataset: ray.data.Dataset, output: str, output_format: str) -> None:
    """Run the job: write `dataset` into the new or empty folder `output`, one file per block; names sort in row
    order. A job that fails, or is interrupted, removes what it wrote: files of some of the rows must not pass
    for the output."""
    _check_output(output)
    filesystem, root = _filesystem(output)
    existed = _file_info(filesystem, root, output).type == pa_fs.FileType.Directory
    common = dict(filesystem=filesystem, ray_remote_args={"num_cpus": 0})  # as for reading: the actors hold the CPUs
    try:
        if output_format == "parquet":
            dataset.write_parquet(root, **common)
        elif output_format == "csv":
            dataset.write_csv(root, **common)
        else:
            dataset.write_json(root, force_ascii=False, **common)  # JSON lines, UTF-8
    except BaseException:
        _remove_written(filesystem, root, existed)
        raise


def _remove_written(filesystem: pa_fs.FileSystem, root: str, existed: bool) -> None:
    """Empty the output folder (`_check_output` found it empty), or remove it if the job made it."""
    with contextlib.suppress(OSError, pa.ArrowException):  # the job's own error is the one to report
        if existed:
            filesystem.delete_dir_contents(root, missing_dir_ok=True)
        else:
            filesystem.delete_dir(root)


def parse_args(args: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Score a file or folder of texts with an exported bundle on a Ray cluster (docs/cluster.md). "
        "The output folder gets every input column, the predicted label and each label's probability, in files "
        "whose names sort in input order.",
    )
    parser.add_argument("bundle", help="bundle folder written by `python -m nlprnn.export` (sent to the workers)")
    parser.add_argument("--input", required=True, metavar="PATH",
                        help=".csv, .tsv, .jsonl or .parquet file, or a folder of them; local or s3://, gs://...")
    parser.add_argument("--output", required=True, metavar="FOLDER", help="a new or empty folder; local or s3://...")
    parser.add_argument("--text_column", default="text", help="the column holding the texts")
    parser.add_argument("--output_format", choices=("parquet", "csv", "jsonl"), default=None,
                        help="format of the output files (default: the --output folder's suffix, else parquet)")
    parser.add_argument("--workers", type=int, default=2, help="actors scoring side by side, one model each")
    parser.add_argument("--threads_per_worker", type=int, default=1, help="CPUs each actor reserves and uses")
    parser.add_argument("--batch_size", type=int, default=64, help="texts per model call")
    parser.add_argument("--address", default=None,
                        help="the cluster: 'auto' (the one `ray start` made on this machine), ray://HEAD:10001, "
                        "or none to start one on this machine")
    return parser.parse_args(args)


def main(args: list[str] | None = None) -> None:
    options = parse_args(args)
    with exit_on_reported_error(PROG):
        _require_ray()
        # Everything a user can get wrong is checked here, before a cluster is joined or a file written.
        labels = read_bundle(options.bundle).labels
        source = open_source(options.input, options.text_column)
        refuse_clashing_columns(labels, source.columns)
        output_format = output_format_of(options.output, options.output_format)
        refuse_unwritable(source.schema, source.files[0], output_format)
        _check_counts(options.workers, options.threads_per_worker)
        _check_output(options.output)
        started = _connect(options.address)
        try:
            _warn_if_too_few_cpus(options.workers * options.threads_per_worker)
            ray.data.DataContext.get_current().execution_options.preserve_order = True
            skipped = start_skipped_rows()
            dataset = score_dataset(read_input(source, options.text_column, skipped), options.bundle,
                                    options.text_column, options.workers, options.threads_per_worker,
                                    options.batch_size)
            write_output(dataset, options.output, output_format)
            count, example = ray.get(skipped.summary.remote())
        finally:
            if started:
                ray.shutdown()
        print(f"wrote the scored rows of {options.input} to {options.output} ({output_format})", file=sys.stderr)
        if count:
            print(f"{count:,} malformed rows were skipped (for example: {example})", file=sys.stderr)


def _require_ray() -> None:
    if ray is None:
        raise UserError('scoring on Ray needs ray[data]: pip install "nlprnn[ray]"')


def _check_counts(workers: int, threads_per_worker: int) -> None:
    if workers < 1 or threads_per_worker < 1:
        raise UserError(f"--workers and --threads_per_worker must be at least 1, not {workers} and "
                        f"{threads_per_worker}")


def _filesystem(path: str) -> tuple[pa_fs.FileSystem, str]:
    """The pyarrow filesystem of `path` and the path within it; local paths are made absolute."""
    if "://" not in path:
        return pa_fs.LocalFileSystem(), str(Path(path).resolve())
    try:
        return pa_fs.FileSystem.from_uri(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UserError(f"cannot open {path}: {first_line(err)}") from None


def _file_info(filesystem: pa_fs.FileSystem, root: str, path: str) -> pa_fs.FileInfo:
    try:
        return filesystem.get_file_info(root)
    except (pa.ArrowException, OSError) as err:  # e.g. no credentials for the bucket
        raise UserError(f"cannot open {path}: {first_line(err)}") from None


def _check_output(output: str) -> None:
    """A new or empty folder: Ray's write is not resumable, and parts of two jobs must not mix."""
    filesystem, root = _filesystem(output)
    info = _file_info(filesystem, root, output)
    if info.type == pa_fs.FileType.File:
        raise UserError(f"--output {output} is a file; give a folder (it will hold the parts)")
    if info.type == pa_fs.FileType.Directory and filesystem.get_file_info(pa_fs.FileSelector(root)):
        raise UserError(f"--output {output} already holds files; give a new or empty folder")


def _connect(address: str | None) -> bool:
    """Join the cluster at `address` (none: start one here) unless this process already has; True if it joined."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address)
    except ConnectionError as err:
        raise UserError(f"cannot reach a Ray cluster at {address}: {first_line(err).rstrip('.')}") from None
    return True


def _warn_if_too_few_cpus(needed: int) -> None:
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus < needed:  # an autoscaling cluster may grow; a fixed one would wait for ever
        print(f"{PROG}: warning: the actors need {needed} CPUs (--workers x --threads_per_worker) but the cluster "
              f"has {cpus}; the job waits until it has them", file=sys.stderr)


if __name__ == "__main__":
    # The importable module's main: actors then load nlprnn.deploy.ray.BundleScorer, not a pickled copy of __main__'s.
    from nlprnn.deploy.ray import main as _main

    _main()
