"""python -m nlprnn.predict BUNDLE "text" ... | --input FILE: one JSON line per text; --output FOLDER: batch scoring.

Each line is {"text": ..., "label": ..., "probabilities": {label: p, ...}}, in input order; with --explain it
also holds "explanation", each word's contribution (see `nlprnn.deploy.explain`), and --explain_format html
writes one HTML page with the words shaded instead. Runs on
onnxruntime, tokenizers and numpy only (the base install); it never imports torch or Lightning.

Empty texts are read as one unknown-word token and get a prediction like any other (see
`nlprnn.deploy.predictor.Predictor`); texts longer than the bundle's max_length tokens are cut to it;
bytes that are not UTF-8 are replaced by U+FFFD.

With --output, the input (also Parquet, or a folder of parts) is scored in bounded memory into a folder of
parts, resumably and with --workers processes: see `nlprnn.deploy.stream`. Rows with no text get no label there.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from nlprnn.errors import UserError, exit_on_reported_error

if TYPE_CHECKING:
    from nlprnn.deploy.predictor import Predictor

CHUNK = 4096  # texts read, predicted and printed at a time: bounded memory, output starts early


def parse_args(args: list[str] | None) -> argparse.Namespace:
    from nlprnn.deploy.stream import ROWS_PER_PART

    parser = argparse.ArgumentParser(
        prog="python -m nlprnn.predict",
        description="Classify texts with an exported bundle; prints one JSON line per text, in input order. "
        "An empty text is read as one unknown-word token; a text longer than the bundle's max_length tokens is cut "
        "to it; bytes that are not UTF-8 become U+FFFD.",
    )
    parser.add_argument("bundle", help="bundle folder written by `python -m nlprnn.export`")
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--input", metavar="PATH",
                        help="read texts from PATH instead: .txt (one per line), .csv, .tsv or .jsonl; '-' is stdin; "
                        "with --output also .parquet, or a folder of parts")
    parser.add_argument("--text_column", default="text", help="the text column of a .csv/.tsv/.jsonl/.parquet input")
    parser.add_argument("--output", metavar="FOLDER", type=Path,
                        help="score --input into FOLDER, part by part, keeping the input's columns; the same "
                        "command run again continues where a stopped run left off")
    parser.add_argument("--output_format", choices=("parquet", "csv", "jsonl"), default=None,
                        help="format of the output parts (default: the --output folder's suffix, else parquet)")
    parser.add_argument("--rows_per_part", type=int, default=ROWS_PER_PART, help="input rows per output part")
    parser.add_argument("--workers", type=int, default=1,
                        help="with --output: processes scoring parts side by side, the cores shared among them")
    parser.add_argument("--batch_size", type=int, default=64, help="texts per model call")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime threads per process (default: its share of the cores it may use)")
    parser.add_argument("--explain", action="store_true",
                        help="add each word's contribution to the predicted label's probability (deleting it, the "
                        "label's probability drops by this much); --batch_size rows of deletions per model call")
    parser.add_argument("--explain_format", choices=("json", "html"), default="json",
                        help="with --explain: JSON lines, or one HTML page with words shaded green (for the label) "
                        "and red (against it)")
    return parser.parse_intermixed_args(args)  # texts may come after options: BUNDLE --explain "text"


def texts_of(options: argparse.Namespace) -> Iterable[str]:
    from nlprnn.deploy.inputs import clean_text, read_texts

    if options.input is not None and options.texts:
        raise UserError("give texts on the command line or --input FILE, not both")
    if options.input is not None:
        return read_texts(options.input, options.text_column)
    if not options.texts:
        raise UserError("nothing to classify: give texts after the bundle folder, or --input FILE")
    return [clean_text(text) for text in options.texts]


def chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def write_explanations(predictor: Predictor, texts: Iterable[str], fmt: str, out: TextIO) -> None:
    from nlprnn.deploy.explain import html_head, html_section, html_tail

    if fmt == "html":
        out.write(html_head())
    for chunk in chunks(texts, CHUNK):
        for text, explanation in zip(chunk, predictor.explain(chunk)):
            if fmt == "html":
                out.write(html_section(text, explanation))
            else:
                out.write(json.dumps({"text": text, **explanation.to_json()}, ensure_ascii=False) + "\n")
    if fmt == "html":
        out.write(html_tail())


def score_into_folder(options: argparse.Namespace) -> None:
    from nlprnn.deploy.stream import Job, score_files
    from nlprnn.deploy.tables import output_format_of

    if options.input is None or options.texts or options.input == "-":
        raise UserError("--output scores a file or folder: give --input PATH and no texts")
    if options.explain:
        raise UserError("--explain writes to standard output; leave out --output")
    job = Job(
        bundle=Path(options.bundle),
        input=Path(options.input),
        text_column=options.text_column,
        output=options.output,
        output_format=output_format_of(options.output, options.output_format),
        rows_per_part=options.rows_per_part,
    )
    score_files(job, workers=options.workers, threads=options.threads, batch_size=options.batch_size)


@contextlib.contextmanager
def ctrl_c_is_one_line(resumable: bool) -> Iterator[None]:
    """Ctrl-C anywhere (reading, printing, before or after scoring parts) stops with one line and exit status 130,
    as it does while parts are scored. Writes are atomic, and a new output folder with no part is removed."""
    try:
        yield
    except KeyboardInterrupt:
        from nlprnn.deploy.stream import Stopped

        raise Stopped(signal.SIGINT, resumable) from None


def main(args: list[str] | None = None) -> None:
    options = parse_args(args)
    with exit_on_reported_error("nlprnn.predict"), ctrl_c_is_one_line(resumable=options.output is not None):
        if options.output is not None:
            return score_into_folder(options)
        if options.workers != 1:
            raise UserError("--workers needs --output: standard output is written by one process")
        from nlprnn.deploy.predictor import Predictor

        predictor = Predictor(options.bundle, batch_size=options.batch_size, threads=options.threads)
        texts = texts_of(options)
        out = sys.stdout
        if hasattr(out, "reconfigure"):
            out.reconfigure(encoding="utf-8")  # JSON lines are UTF-8 whatever the locale says
        try:
            if options.explain:
                write_explanations(predictor, texts, options.explain_format, out)
            else:
                for chunk in chunks(texts, CHUNK):
                    for text, (label, probabilities) in zip(chunk, predictor.predict(chunk)):
                        out.write(json.dumps({"text": text, "label": label, "probabilities": probabilities},
                                             ensure_ascii=False) + "\n")
            out.flush()
        except BrokenPipeError:  # the reader (e.g. `head`) has seen enough
            # Point stdout at /dev/null so that flushing it at exit does not fail a second time.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None


if __name__ == "__main__":
    main()
