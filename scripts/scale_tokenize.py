"""Tokenization at scale: TextDataModule preparation against bare `tokenizer.encode_batch`, same texts.

    python scripts/scale_tokenize.py --docs 1000000 --workdir /tmp/nlprnn-scale

Generates a seeded synthetic corpus (Parquet, review-like lengths and a Zipf vocabulary), trains one
word-level tokenizer on a sample of it, then runs each contender in a fresh process and reports docs/s
and peak resident memory (RSS, largest worker included):

- encode_batch: read the corpus in record batches and call `tokenizer.encode_batch` on each; nothing kept.
- datamodule:   `TextDataModule(train_file=corpus, tokenizer.file=that tokenizer).prepare_data()`: read,
                check, split, tokenize through `datasets` and write the cached Arrow splits.

Targets: datamodule peak RSS under 3 GB and at least half the docs/s of encode_batch. Timing numbers
mean something only on a quiet machine; the corpus and tokenizer are reused between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RSS_TARGET_MB = 3 * 1024
THROUGHPUT_TARGET = 0.5  # of encode_batch's docs/s
CHUNK_DOCS = 50_000  # docs generated (and written) at a time
VOCAB_WORDS = 50_000
TOKENIZER_SAMPLE = 100_000  # docs the tokenizer learns from


def synthetic_words(n: int, rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    lengths = rng.integers(2, 11, n)
    return np.array(["".join(rng.choice(letters, k)) + str(i) for i, k in enumerate(lengths)])


def generate_corpus(path: Path, docs: int, seed: int = 0) -> None:
    """`docs` rows of (text, label): 5-400 words, about 90 on average, Zipf-distributed, some punctuation."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = synthetic_words(VOCAB_WORDS, rng)
    weights = 1.0 / np.arange(1, VOCAB_WORDS + 1)
    weights /= weights.sum()
    scratch = path.with_name(path.name + ".partial")
    with pq.ParquetWriter(scratch, pa.schema([("text", pa.string()), ("label", pa.string())])) as writer:
        for start in range(0, docs, CHUNK_DOCS):
            n = min(CHUNK_DOCS, docs - start)
            lengths = np.clip(rng.lognormal(4.3, 0.6, n).astype(int), 5, 400)
            tokens = words[rng.choice(VOCAB_WORDS, lengths.sum(), p=weights)]
            tokens[rng.random(len(tokens)) < 0.06] = "."
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            texts = [" ".join(tokens[bounds[i] : bounds[i + 1]]) for i in range(n)]
            labels = np.where(rng.random(n) < 0.5, "positive", "negative")
            writer.write_table(pa.table({"text": texts, "label": labels}))
    scratch.replace(path)


def train_shared_tokenizer(corpus: Path, out: Path) -> None:
    import pyarrow.parquet as pq

    from nlprnn.data.tokenizer import TokenizerConfig, train_tokenizer

    def sample():
        seen = 0
        for batch in pq.ParquetFile(corpus).iter_batches(batch_size=10_000, columns=["text"]):
            yield batch.column(0).to_pylist()
            seen += batch.num_rows
            if seen >= TOKENIZER_SAMPLE:
                return

    train_tokenizer(sample(), TokenizerConfig(kind="wordlevel", vocab_size=20_000)).save(str(out))


def peak_rss_mb() -> dict[str, float]:
    """Peak RSS of this process and of its largest finished child (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_rss_worker_mb": round(children, 1)}


def run_encode_batch(corpus: Path, tokenizer_file: Path) -> dict:
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    docs = 0
    start = time.perf_counter()
    for batch in pq.ParquetFile(corpus).iter_batches(batch_size=10_000, columns=["text"]):
        encodings = tokenizer.encode_batch(batch.column(0).to_pylist())
        docs += len(encodings)
    return {"docs": docs, "seconds": time.perf_counter() - start}


def run_datamodule(corpus: Path, tokenizer_file: Path, max_length: int, num_proc: int | None) -> dict:
    import datasets

    from nlprnn.data.datamodule import TextDataModule
    from nlprnn.data.tokenizer import TokenizerConfig

    datasets.disable_progress_bars()
    data = TextDataModule(
        train_file=str(corpus), tokenizer=TokenizerConfig(file=str(tokenizer_file)), max_length=max_length,
        num_proc=num_proc,
    )
    start = time.perf_counter()
    data.prepare_data()
    seconds = time.perf_counter() - start
    meta = json.loads((data.prepared_dir / "meta.json").read_text())
    return {"docs": sum(meta["sizes"].values()), "seconds": seconds, "truncated": sum(meta["truncated"].values())}


def measure(phase: str, args: argparse.Namespace, corpus: Path, tokenizer_file: Path) -> dict:
    """Run one phase in a fresh process (so its peak RSS is its own) with an empty nlprnn cache."""
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="cache-") as cache:
        env = {**os.environ, "NLPRNN_CACHE": cache}
        if args.threads:
            env.update(RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, __file__, "--phase", phase, "--corpus", str(corpus), "--tokenizer", str(tokenizer_file),
               "--max-length", str(args.max_length)] + (["--num-proc", str(args.num_proc)] if args.num_proc else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{phase} failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
    result["docs_per_s"] = result["docs"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000, help="corpus size")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nlprnn-scale")
    parser.add_argument("--max-length", type=int, default=256, help="data.max_length of the data module")
    parser.add_argument("--num-proc", type=int, default=None, help="data.num_proc: tokenizing processes")
    parser.add_argument("--threads", type=int, default=None, help="cap the tokenizer's threads (RAYON_NUM_THREADS)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--phase", choices=["encode_batch", "datamodule"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:  # a child process: one measurement, one JSON line
        if args.phase == "encode_batch":
            result = run_encode_batch(args.corpus, args.tokenizer)
        else:
            result = run_datamodule(args.corpus, args.tokenizer, args.max_length, args.num_proc)
        print(json.dumps({**result, **peak_rss_mb()}))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = args.workdir / f"corpus-{args.docs}.parquet"
    tokenizer_file = args.workdir / f"tokenizer-{args.docs}.json"
    if not corpus.exists():
        print(f"generating {args.docs:,} documents into {corpus} ...", flush=True)
        generate_corpus(corpus, args.docs)
    if not tokenizer_file.exists():
        train_shared_tokenizer(corpus, tokenizer_file)
    print(f"corpus {corpus} ({corpus.stat().st_size / 2**20:,.0f} MiB Parquet)", flush=True)

    results = {phase: measure(phase, args, corpus, tokenizer_file) for phase in ("encode_batch", "datamodule")}
    for phase, r in results.items():
        print(f"{phase:<13} {r['docs']:>10,} docs {r['seconds']:>8.1f} s {r['docs_per_s']:>10,.0f} docs/s  "
              f"peak RSS {r['peak_rss_mb']:>7,.0f} MiB (largest worker {r['peak_rss_worker_mb']:,.0f} MiB)")
    ratio = results["datamodule"]["docs_per_s"] / results["encode_batch"]["docs_per_s"]
    rss = max(results["datamodule"]["peak_rss_mb"], results["datamodule"]["peak_rss_worker_mb"])
    print(f"datamodule / encode_batch throughput: {ratio:.2f} (target >= {THROUGHPUT_TARGET}) "
          f"{'ok' if ratio >= THROUGHPUT_TARGET else 'MISSED'}")
    print(f"datamodule peak RSS: {rss:,.0f} MiB (target < {RSS_TARGET_MB:,} MiB) {'ok' if rss < RSS_TARGET_MB else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"docs": args.docs, "num_proc": args.num_proc, "results": results,
                                         "throughput_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
