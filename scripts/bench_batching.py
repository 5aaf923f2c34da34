"""How a server should run a gathered batch: model calls of how many texts?

    .venv/bin/python scripts/bench_batching.py BUNDLE --texts corpus.csv [--group 64] [--sizes 64,32,16,8,4,1]
    .venv/bin/python scripts/bench_batching.py BUNDLE --texts corpus.csv --parallel_calls   # as the server runs them

A serving batch is `--group` texts that arrived together, of mixed lengths. `Predictor.score` sorts them by
length and runs them in model calls of `batch_size` texts, each padded to its own longest; this prints the
texts/s of each batch size over consecutive groups of the file's texts (the first `--limit`), after one warm-up
group, with the Predictor's default threads unless `--threads` is given; `--parallel_calls` runs a group's calls
on those threads at once, one core each, as `nlprnn.serve` does. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import csv
import time

from nlprnn.deploy.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--texts", required=True, help="a CSV file with a text column")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--group", type=int, default=64, help="texts gathered into one serving batch")
    parser.add_argument("--sizes", default="64,32,16,8,4,1", help="model batch sizes to compare")
    parser.add_argument("--limit", type=int, default=12_000, help="texts to score for each size")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: the cores)")
    parser.add_argument("--parallel_calls", action="store_true", help="one core per call, calls at once (the server's way)")
    options = parser.parse_args()
    with open(options.texts, newline="", encoding="utf-8") as f:
        texts = [row[options.text_column] for _, row in zip(range(options.limit), csv.DictReader(f))]
    groups = [texts[i : i + options.group] for i in range(0, len(texts), options.group)]
    for size in map(int, options.sizes.split(",")):
        predictor = Predictor(options.bundle, batch_size=size, threads=options.threads,
                              parallel_calls=options.parallel_calls)
        predictor.score(groups[0])
        started = time.perf_counter()
        for group in groups:
            predictor.score(group)
        rate = len(texts) / (time.perf_counter() - started)
        print(f"groups of {options.group}, model calls of {size:>3}: {rate:8,.0f} texts/s")


if __name__ == "__main__":
    main()
