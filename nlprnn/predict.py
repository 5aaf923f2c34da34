"""python -m nlprnn.predict BUNDLE "text" ... | --input FILE: one JSON line per text.

Each line is {"text": ..., "label": ..., "probabilities": {label: p, ...}}, in input order; with --explain it
also holds "explanation", each word's contribution (see `nlprnn.deploy.explain`), and --explain_format html
writes one HTML page with the words shaded instead. Runs on
onnxruntime, tokenizers and numpy only (the base install); it never imports torch or Lightning.

Empty texts are read as one unknown-word token and get a prediction like any other (see
`nlprnn.deploy.predictor.Predictor`); texts longer than the bundle's max_length tokens are cut to it;
bytes that are not UTF-8 are replaced by U+FFFD.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TextIO

from nlprnn.errors import UserError, exit_on_reported_error

if TYPE_CHECKING:
    from nlprnn.deploy.predictor import Predictor

CHUNK = 4096  # texts read, predicted and printed at a time: bounded memory, output starts early


def parse_args(args: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m nlprnn.predict",
        description="Classify texts with an exported bundle; prints one JSON line per text, in input order. "
        "An empty text is read as one unknown-word token; a text longer than the bundle's max_length tokens is cut "
        "to it; bytes that are not UTF-8 become U+FFFD.",
    )
    parser.add_argument("bundle", help="bundle folder written by `python -m nlprnn.export`")
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--input", metavar="FILE",
                        help="read texts from FILE instead: .txt (one per line), .csv, .tsv or .jsonl; '-' is stdin")
    parser.add_argument("--text_column", default="text", help="the text column of a .csv/.tsv/.jsonl input")
    parser.add_argument("--batch_size", type=int, default=64, help="texts per model call")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime threads (default: the cores this process may use)")
    parser.add_argument("--explain", action="store_true",
                        help="add each word's contribution to the predicted label's probability (deleting it, the "
                        "label's probability drops by this much); one model call per text")
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


def main(args: list[str] | None = None) -> None:
    options = parse_args(args)
    with exit_on_reported_error("nlprnn.predict"):
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
