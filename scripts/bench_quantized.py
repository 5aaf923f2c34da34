"""Float against int8 bundles of the same checkpoints: size, label agreement, accuracy and speed.

    python scripts/bench_quantized.py checkpoints/<run> [checkpoints/<other run> ...] --threads 2

Each checkpoint is exported twice (`python -m nlprnn.export RUN` and `... --quantize int8`); agreement and
accuracies are the ones the int8 export measured on the validation split and wrote to nlprnn.json.
Latency is one text per call (p50, ms), throughput is texts per second in batches of 64, both on token
ids drawn from the vocabulary as in bench_inference.py, with the two bundles' calls alternating so
machine load hits both alike. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench_inference import drawn_texts, timed
from nlprnn.deploy.predictor import Predictor
from nlprnn.errors import exit_on_reported_error
from nlprnn.export import export_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoints of `python -m nlprnn.fit`, or their run folders")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads within an operator")
    parser.add_argument("--texts", type=int, default=512, help="drawn texts to time")
    parser.add_argument("--runs", type=int, default=500, help="timed single-text calls per bundle")
    parser.add_argument("--rounds", type=int, default=5, help="passes over all texts in batches of 64")
    return parser.parse_args()


def measure(bundles: dict[str, Path], threads: int, count: int, runs: int, rounds: int) -> dict[str, dict[str, float]]:
    """p50 latency (ms) at batch 1 and throughput (texts/s) at batch 64 of each bundle, on the same ids."""
    predictors = {name: Predictor(bundle, batch_size=64, threads=threads) for name, bundle in bundles.items()}
    first = next(iter(predictors.values()))
    ids = first.encode(drawn_texts(first, count, 8, 40))
    singles = [first.pad([row]) for row in ids]
    batches = [first.pad(ids[i : i + 64]) for i in range(0, len(ids), 64)]
    latency: dict[str, list[float]] = {name: [] for name in predictors}
    busy = dict.fromkeys(predictors, 0.0)
    for i in range(20 + runs):
        for name, predictor in predictors.items():
            seconds = timed(lambda: predictor.run(*singles[i % len(singles)]))
            if i >= 20:  # the first calls warm up
                latency[name].append(seconds)
    for _ in range(rounds):
        for batch in batches:
            for name, predictor in predictors.items():
                busy[name] += timed(lambda: predictor.run(*batch))
    return {
        name: {"p50_ms": 1e3 * float(np.percentile(latency[name], 50)), "texts_per_s": rounds * len(ids) / busy[name]}
        for name in predictors
    }


def main() -> None:
    options = parse_args()
    print("| model | bundle | model.onnx MB | label agreement | val. accuracy | p50 ms (batch 1) | texts/s (batch 64) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with exit_on_reported_error("bench_quantized"), tempfile.TemporaryDirectory() as scratch:
        for checkpoint in map(Path, options.checkpoints):
            name = checkpoint.name if checkpoint.is_dir() else checkpoint.parent.name
            bundles = {
                "float": export_checkpoint(checkpoint, Path(scratch) / name / "float"),
                "int8": export_checkpoint(checkpoint, Path(scratch) / name / "int8", quantize="int8"),
            }
            speed = measure(bundles, options.threads, options.texts, options.runs, options.rounds)
            record = Predictor(bundles["int8"], threads=1).bundle.manifest.quantization
            for kind, bundle in bundles.items():
                size = (bundle / "model.onnx").stat().st_size / 1e6
                agreement = f"{record['label_agreement']:.2%}" if kind == "int8" else "-"
                accuracy = record["accuracy_int8" if kind == "int8" else "accuracy_float"]
                print(f"| {name} | {kind} | {size:.2f} | {agreement} | {accuracy:.2%} | "
                      f"{speed[kind]['p50_ms']:.3f} | {speed[kind]['texts_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
