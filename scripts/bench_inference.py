"""Inference speed of a trained model: onnxruntime (the exported bundle) against PyTorch eager.

    python scripts/bench_inference.py checkpoints/<run>            # the run's best.ckpt
    python scripts/bench_inference.py path/to/model.ckpt --json bench.json

Reports single-text latency (p50, p99, in ms; one text per call, as a request handler sees it) and
batch-64 throughput (texts per second), for both engines on the same token ids and the same number
of threads; one more row gives the latency of `Predictor.predict` on raw text, tokenizer included.
Calls of the two engines alternate, so a change in machine load hits both alike. Texts come from
--input (.txt/.csv/.tsv/.jsonl), or are drawn from the tokenizer's vocabulary with 8..40 tokens (the
range of most movie-snippets reviews). Run it on a quiet machine; the numbers depend on the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from nlprnn.deploy.inputs import read_texts
from nlprnn.deploy.predictor import Predictor
from nlprnn.threads import available_cores
from nlprnn.errors import exit_on_reported_error
from nlprnn.export import BEST, export_checkpoint, load_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint of `python -m nlprnn.fit`, or its run folder (best.ckpt)")
    parser.add_argument("--input", help="texts to time (.txt/.csv/.tsv/.jsonl); default: drawn from the vocabulary")
    parser.add_argument("--text_column", default="text", help="the text column of a .csv/.tsv/.jsonl input")
    parser.add_argument("--texts", type=int, default=512, help="how many texts to use")
    parser.add_argument("--min_tokens", type=int, default=8, help="shortest drawn text, in tokens")
    parser.add_argument("--max_tokens", type=int, default=40, help="longest drawn text, in tokens")
    parser.add_argument("--runs", type=int, default=1000, help="timed single-text calls per engine")
    parser.add_argument("--batch_size", type=int, default=64, help="texts per call in the throughput test")
    parser.add_argument("--rounds", type=int, default=5, help="passes over all texts in the throughput test")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per engine before timing")
    parser.add_argument("--threads", type=int, default=None, help="threads for both engines (default: all CPUs allowed)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_args()


def drawn_texts(predictor: Predictor, count: int, low: int, high: int, seed: int = 0) -> list[str]:
    """Texts of random known words, `low` to `high` of them each."""
    special = {predictor.pad_id, predictor.unk_id}
    words = [w for w, i in predictor.tokenizer.get_vocab().items() if i not in special and w.isalpha()]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=rng.integers(low, high + 1))) for _ in range(count)]


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    options = parse_args()
    threads = options.threads or available_cores()
    torch.set_num_threads(threads)
    checkpoint = Path(options.checkpoint)
    checkpoint = checkpoint / BEST if checkpoint.is_dir() else checkpoint
    with exit_on_reported_error("bench_inference"), tempfile.TemporaryDirectory() as scratch:
        bundle = export_checkpoint(checkpoint, Path(scratch) / "bundle")
        predictor = Predictor(bundle, batch_size=options.batch_size, threads=threads)
        model = load_checkpoint(checkpoint).eval()
        if options.input:
            texts = [t for t in read_texts(options.input, options.text_column) if t.strip()][: options.texts]
        else:
            texts = drawn_texts(predictor, options.texts, options.min_tokens, options.max_tokens)
        ids = predictor.encode(texts)
        singles = [predictor.pad([row]) for row in ids]  # (1, T) ids, (1,) lengths
        batches = [predictor.pad(ids[i : i + options.batch_size]) for i in range(0, len(ids), options.batch_size)]

        def eager(batch_ids: np.ndarray, lengths: np.ndarray) -> None:
            with torch.inference_mode():
                model(torch.from_numpy(batch_ids), torch.from_numpy(lengths))

        engines = {"onnxruntime": predictor.run, "pytorch eager": eager}
        latency = {name: [] for name in engines} | {"onnxruntime + tokenizer": []}
        for i in range(options.warmup + options.runs):
            batch = singles[i % len(singles)]
            times = {name: timed(lambda: run(*batch)) for name, run in engines.items()}
            times["onnxruntime + tokenizer"] = timed(lambda: predictor.predict([texts[i % len(texts)]]))
            if i >= options.warmup:
                for name, seconds in times.items():
                    latency[name].append(seconds)
        busy = {name: 0.0 for name in engines}
        for name, run in engines.items():
            run(*batches[0])  # warm-up at the batch shape
        for _ in range(options.rounds):
            for batch in batches:
                for name, run in engines.items():
                    busy[name] += timed(lambda: run(*batch))

    lengths = np.array([len(row) for row in ids])
    results = {
        "checkpoint": str(checkpoint),
        "threads": threads,
        "texts": len(texts),
        "tokens": {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max())},
        "batch_size": options.batch_size,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "cpu": platform.processor() or platform.machine(),
        "engines": {
            name: {
                "p50_ms": 1e3 * float(np.percentile(seconds, 50)),
                "p99_ms": 1e3 * float(np.percentile(seconds, 99)),
                "throughput_texts_per_s": options.rounds * len(texts) / busy[name] if name in busy else None,
            }
            for name, seconds in latency.items()
        },
    }
    print_table(results)
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2) + "\n")


def print_table(results: dict) -> None:
    tokens = results["tokens"]
    print(f"{results['texts']} texts of {tokens['min']}-{tokens['max']} tokens (mean {tokens['mean']:.1f}), "
          f"{results['threads']} thread(s), torch {results['versions']['torch']}, "
          f"onnxruntime {results['versions']['onnxruntime']}")
    print(f"{'engine':<26}{'p50 ms':>9}{'p99 ms':>9}{'batch-' + str(results['batch_size']) + ' texts/s':>20}")
    for name, row in results["engines"].items():
        throughput = f"{row['throughput_texts_per_s']:.0f}" if row["throughput_texts_per_s"] else "-"
        print(f"{name:<26}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{throughput:>20}")


if __name__ == "__main__":
    main()
