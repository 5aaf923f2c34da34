"""Streaming batch scoring at scale: `python -m nlprnn.predict --output` against in-memory `Predictor.score`.

    .venv/bin/python scripts/bench_stream.py /tmp/bundle-movie --ray --json docs/stream-1m.json
    .venv/bin/python scripts/bench_stream.py BUNDLE --texts 20000 --rows-per-part 5000 --workdir /tmp/smoke  # smoke run

The corpus: `--texts` rows (id, text) drawn with a seeded RNG from real snippets, the texts of the built-in
datasets movie-snippets (60% of draws), trec6 and sms-spam (20% each), loaded with `nlprnn.data.catalog`
(fetched once into $NLPRNN_CACHE); a row's text is one snippet, or two joined (30% of rows), so that few
rows repeat exactly. `--source-csv` draws from the text column of a CSV instead. The corpus is written as
CSV (or Parquet, `--input-format`) into `--workdir` and reused by later runs with the same size and seed.

Each step runs in a fresh process, one after the other; this process samples, every 0.1 s from /proc,
the resident memory (RSS) of the step's whole process tree (the step's process and all its children,
summed) and keeps the peak. RSS summed over processes counts pages they share (the loaded libraries,
the model) once per process, so it overstates what the tree really holds; the proportional share (PSS)
sum, reported beside it (sampled every 0.5 s: it is dearer to read), does not. Cross-checks that a
0.1 s sample cannot miss: each process's own peak (the kernel's VmHWM), the largest of them, and their
sum (an upper bound of the tree's peak).

1. in-memory: a process reads all texts into a Python list (not timed), builds
   `Predictor(bundle, threads=<all cores>)` (not timed), scores 64 texts to warm up, then times
   `predictor.score(chunk)` over every text in chunks of 16,384 (the slice `score_table` hands the
   Predictor when streaming): the ceiling, texts/s.
2. workers 1: `python -m nlprnn.predict BUNDLE --input CORPUS --output FRESH_FOLDER --workers 1`; rows/s is
   the corpus size over the process's wall-clock time, start-up, reading and writing the parts included.
3. workers 2: the same with `--workers 2` (one onnxruntime thread per worker process instead of two).
4. with `--ray`: `python -m nlprnn.deploy.ray BUNDLE --input CORPUS --output FRESH_FOLDER --workers 2`,
   skipped when that module or Ray is missing. Its tree includes Ray's own services (GCS, raylet,
   dashboard, idle workers) and Ray's shared-memory object store, so its memory is not comparable.

Targets (the streaming issue's "done when"): peak tree RSS of steps 2 and 3 under 1.5 GB (1,500 MB;
MB here are 10^6 bytes), step 2 at least 0.8x the in-memory texts/s, step 3 at least 1.6x step 2; and
every streaming output's `_SUCCESS` counts the corpus's rows. PASS/FAIL per target is printed and
written to `--json`; the exit status is 0 whenever every step ran. Timings mean something only on a
quiet machine with the full-size corpus; tiny runs only check that the script works.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"movie-snippets": 0.6, "trec6": 0.2, "sms-spam": 0.2}  # built-in dataset: share of the draws
JOIN_PROBABILITY = 0.3  # of a row's text being two snippets joined
SLICE_TEXTS = 16_384  # texts per Predictor.score call: score_table's slice_rows
WARMUP_TEXTS = 64
CHUNK_ROWS = 100_000  # corpus rows generated and written at a time
SAMPLE_EVERY_S = 0.1
PSS_EVERY = 5  # samples: PSS is dearer to read than RSS, and only informative
RSS_LIMIT_MB = 1_500.0  # 1.5 GB, in 10^6 bytes
TARGETS = {  # name: (bound, what)
    "rss_workers_1": (RSS_LIMIT_MB, "peak RSS of the --workers 1 process tree, MB"),
    "rss_workers_2": (RSS_LIMIT_MB, "peak RSS of the --workers 2 process tree, MB"),
    "workers_1_vs_in_memory": (0.8, "--workers 1 rows/s as a fraction of in-memory Predictor.score texts/s"),
    "workers_2_vs_workers_1": (1.6, "--workers 2 rows/s over --workers 1 rows/s"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="a bundle folder written by `python -m nlprnn.export`")
    parser.add_argument("--texts", type=int, default=1_000_000, help="corpus rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus draws")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nlprnn-stream",
                        help="where the corpus, the outputs and the steps' logs go (the corpus is reused)")
    parser.add_argument("--input-format", "--input_format", choices=("csv", "parquet"), default="csv",
                        help="format of the corpus file the steps read")
    parser.add_argument("--source-csv", type=Path, default=None,
                        help="draw the texts from this CSV's text column instead of the built-in datasets")
    parser.add_argument("--text-column", default="text", help="the text column of --source-csv")
    parser.add_argument("--rows-per-part", type=int, default=None,
                        help="passed to nlprnn.predict as --rows_per_part (default: its own)")
    parser.add_argument("--ray", action="store_true",
                        help="also time `python -m nlprnn.deploy.ray ... --workers 2` (skipped if it is missing)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the steps' output folders")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--phase", choices=["in_memory"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.texts < 1:
        parser.error("--texts must be at least 1")
    return options


# --- the corpus -----------------------------------------------------------------------------------


def snippet_pools(source_csv: Path | None, text_column: str) -> dict[str, list[str]]:
    """Real texts to draw from, by source, whitespace collapsed (so a CSV row is one line) and empties dropped."""
    if source_csv is not None:
        import pyarrow.csv as pa_csv

        table = pa_csv.read_csv(source_csv, convert_options=pa_csv.ConvertOptions(include_columns=[text_column]))
        pools = {source_csv.name: table.column(text_column).to_pylist()}
    else:
        from nlprnn.data.catalog import load_builtin

        pools = {name: load_builtin(name).data.column("text").to_pylist() for name in SOURCES}
    pools = {name: [" ".join(str(t).split()) for t in texts if t and str(t).strip()] for name, texts in pools.items()}
    empty = [name for name, texts in pools.items() if not texts]
    if empty:
        sys.exit(f"no texts to draw from in {', '.join(empty)}")
    return pools


def corpus_tag(source_csv: Path | None) -> str:
    if source_csv is None:
        return "snippets"
    return "csv-" + hashlib.sha256(source_csv.read_bytes()).hexdigest()[:12]


def generate_corpus(path: Path, rows: int, seed: int, pools: dict[str, list[str]], fmt: str) -> dict:
    """Write `rows` rows of (id, text) to `path`; return what it holds."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    names = list(pools)
    snippets = np.array([text for name in names for text in pools[name]], dtype=object)
    share = {name: SOURCES.get(name, 1.0) for name in names}
    total = sum(share.values())
    weights = np.concatenate([np.full(len(pools[n]), share[n] / total / len(pools[n])) for n in names])
    weights /= weights.sum()
    width = max(7, len(str(rows)))
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    scratch = path.with_name(path.name + ".partial")
    writer = pq.ParquetWriter(str(scratch), schema) if fmt == "parquet" else pa_csv.CSVWriter(str(scratch), schema)
    joined = chars = 0
    with writer:
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            first = snippets[rng.choice(len(snippets), n, p=weights)]
            second = snippets[rng.choice(len(snippets), n, p=weights)]
            join = rng.random(n) < JOIN_PROBABILITY
            texts = [f"{a} {b}" if j else a for a, b, j in zip(first, second, join)]
            ids = [f"r{i:0{width}d}" for i in range(start + 1, start + n + 1)]
            writer.write_table(pa.table({"id": ids, "text": texts}, schema=schema))
            joined += int(join.sum())
            chars += sum(map(len, texts))
    scratch.replace(path)
    return {"rows": rows, "seed": seed, "format": fmt, "sources": {n: len(pools[n]) for n in names},
            "source_shares": {n: share[n] / total for n in names}, "joined_rows": joined,
            "mean_chars": chars / rows}


def ensure_corpus(options: argparse.Namespace) -> tuple[Path, dict]:
    """The corpus of this size, seed and source, generated unless an earlier run left it."""
    options.workdir.mkdir(parents=True, exist_ok=True)
    stem = f"corpus-{options.texts}-seed{options.seed}-{corpus_tag(options.source_csv)}"
    path = options.workdir / f"{stem}.{options.input_format}"
    meta_file = options.workdir / f"{stem}.{options.input_format}.json"
    if path.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        print(f"reusing corpus {path} ({path.stat().st_size / 1e6:,.0f} MB)", flush=True)
        return path, meta
    print(f"generating {options.texts:,} texts into {path} ...", flush=True)
    started = time.perf_counter()
    meta = generate_corpus(path, options.texts, options.seed, snippet_pools(options.source_csv, options.text_column),
                           options.input_format)
    meta["generated_in_s"] = round(time.perf_counter() - started, 1)
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return path, meta


def read_corpus_texts(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=["text"]).column("text").to_pylist()
    import pyarrow.csv as pa_csv

    convert = pa_csv.ConvertOptions(include_columns=["text"], column_types={"text": "string"},
                                    strings_can_be_null=False)
    return pa_csv.read_csv(path, convert_options=convert).column("text").to_pylist()


# --- measuring a process tree ---------------------------------------------------------------------


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (field 4 of /proc/PID/stat, after the parenthesised name)."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    parents[int(entry.name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def tree_of(root: int) -> list[int]:
    """`root` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def memory_of(pid: int, pss: bool = True) -> tuple[int, int, int]:
    """(RSS now, peak RSS so far, PSS now or 0 unless `pss`) of one process, in bytes; zeros once it is gone.

    The peak is the kernel's VmHWM, which starts afresh at exec: unlike wait4's ru_maxrss, it does not
    inherit the high-water mark of the (large) process that forked the command.
    """
    rss = peak = proportional = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        if pss:  # about 1 ms a process (status: 0.02 ms), and it walks the memory map under its lock
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        proportional = int(line.split()[1]) * 1024
                        break
    except (OSError, ValueError, IndexError):
        pass
    return rss, peak, proportional


class TreeSampler(threading.Thread):
    """Samples the summed RSS and PSS of a process tree until stopped; keeps the peaks."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stopped = threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.process_peaks: dict[int, int] = {}  # pid -> its VmHWM, last seen
        self.max_processes = self.samples = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(SAMPLE_EVERY_S)

    def sample(self) -> None:
        with_pss = self.samples % PSS_EVERY == 0
        sizes = {pid: memory_of(pid, with_pss) for pid in tree_of(self.root)}
        for pid, (rss, peak, _) in sizes.items():
            if rss:
                self.process_peaks[pid] = max(peak, self.process_peaks.get(pid, 0))
        self.peak_rss = max(self.peak_rss, sum(rss for rss, _, _ in sizes.values()))
        self.peak_pss = max(self.peak_pss, sum(pss for _, _, pss in sizes.values()))
        self.max_processes = max(self.max_processes, sum(1 for rss, _, _ in sizes.values() if rss))
        self.samples += 1


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_measured(name: str, command: list[str], log_file: Path) -> dict:
    """Run `command` to its end, sampling its process tree's memory; its wall time and memory peaks."""
    print(f"[{name}] {' '.join(command)}", flush=True)
    with log_file.open("w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
        sampler = TreeSampler(process.pid)
        sampler.start()
        process.wait()
        wall = time.perf_counter() - started
        sampler.stopped.set()
        sampler.join()
    if process.returncode != 0:
        sys.exit(f"[{name}] failed with exit status {process.returncode}; the end of {log_file}:\n"
                 f"{log_file.read_text()[-3000:]}")
    return {
        "command": command,
        "wall_s": wall,
        "peak_rss_mb": sampler.peak_rss / 1e6,
        "peak_pss_mb": sampler.peak_pss / 1e6,
        "largest_process_peak_rss_mb": max(sampler.process_peaks.values(), default=0) / 1e6,
        "sum_of_process_peaks_mb": sum(sampler.process_peaks.values()) / 1e6,
        "max_processes": sampler.max_processes,
        "memory_samples": sampler.samples,
        "log": str(log_file),
    }


# --- the steps ------------------------------------------------------------------------------------


def in_memory_phase(bundle: str, corpus: Path) -> dict:
    """In the child: all texts in a list, then Predictor.score over them in slices; one JSON line out."""
    from nlprnn.deploy.predictor import Predictor
    from nlprnn.threads import available_cores

    texts = read_corpus_texts(corpus)
    threads = available_cores()
    started = time.perf_counter()
    predictor = Predictor(bundle, threads=threads)
    load_s = time.perf_counter() - started
    predictor.score(texts[:WARMUP_TEXTS])
    started = time.perf_counter()
    for start in range(0, len(texts), SLICE_TEXTS):
        predictor.score(texts[start : start + SLICE_TEXTS])
    seconds = time.perf_counter() - started
    return {"texts": len(texts), "seconds": seconds, "predictor_load_s": load_s, "threads": threads,
            "batch_size": predictor.batch_size}


def measure_in_memory(options: argparse.Namespace, corpus: Path, logs: Path) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), options.bundle, "--phase", "in_memory",
               "--corpus", str(corpus)]
    result = run_measured("in-memory", command, logs / "in_memory.log")
    lines = Path(result["log"]).read_text().splitlines()
    reported = json.loads(next(line for line in reversed(lines) if line.startswith('{"texts"')))
    return {**result, **reported, "rows": reported["texts"], "rows_per_s": reported["texts"] / reported["seconds"]}


def output_rows(folder: Path) -> tuple[int | None, dict | None]:
    """Rows in an output folder: its `_SUCCESS` summary's, else counted in its parts (None if unreadable)."""
    success = folder / "_SUCCESS"
    if success.is_file():
        try:
            summary = json.loads(success.read_text())
            return int(summary["rows"]), summary
        except (ValueError, KeyError, TypeError):
            pass
    try:
        import pyarrow.dataset as ds

        files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(("_", "."))]
        kinds = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
        fmt = {kinds.get(p.suffix) for p in files} - {None}
        if len(fmt) != 1:
            return None, None
        return ds.dataset([str(p) for p in files if p.suffix in kinds], format=fmt.pop()).count_rows(), None
    except Exception:  # noqa: BLE001 - any reader failure only means the count is unknown
        return None, None


def measure_command(name: str, command: list[str], output: Path, options: argparse.Namespace, logs: Path) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    result = run_measured(name, command, logs / f"{name}.log")
    rows, summary = output_rows(output)
    result.update(rows=rows, rows_per_s=options.texts / result["wall_s"], rows_ok=rows == options.texts)
    if summary is not None:
        result["success"] = summary
    if not options.keep_outputs:
        shutil.rmtree(output, ignore_errors=True)
    return result


def measure_streaming(workers: int, options: argparse.Namespace, corpus: Path, logs: Path) -> dict:
    output = options.workdir / f"out-workers-{workers}"
    command = [sys.executable, "-m", "nlprnn.predict", options.bundle, "--input", str(corpus),
               "--output", str(output), "--workers", str(workers)]
    if options.rows_per_part:
        command += ["--rows_per_part", str(options.rows_per_part)]
    return measure_command(f"workers_{workers}", command, output, options, logs)


def ray_missing() -> str | None:
    """Why the Ray step cannot run here, or None if it can."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed"
    if importlib.util.find_spec("nlprnn.deploy.ray") is None:
        return "nlprnn.deploy.ray does not exist yet"
    return None


def measure_ray(options: argparse.Namespace, corpus: Path, logs: Path) -> dict:
    reason = ray_missing()
    if reason:
        print(f"[ray] skipped: {reason}", flush=True)
        return {"skipped": reason}
    output = options.workdir / "out-ray"
    command = [sys.executable, "-m", "nlprnn.deploy.ray", options.bundle, "--input", str(corpus),
               "--output", str(output), "--workers", "2"]
    result = measure_command("ray", command, output, options, logs)
    result["memory_note"] = "includes Ray's services and shared object store: not comparable with the other steps"
    return result


# --- report ---------------------------------------------------------------------------------------


def check_targets(steps: dict) -> dict:
    memory, one, two = steps["in_memory"], steps["workers_1"], steps["workers_2"]
    values = {
        "rss_workers_1": one["peak_rss_mb"],
        "rss_workers_2": two["peak_rss_mb"],
        "workers_1_vs_in_memory": one["rows_per_s"] / memory["rows_per_s"],
        "workers_2_vs_workers_1": two["rows_per_s"] / one["rows_per_s"],
    }
    found = {}
    for name, value in values.items():
        bound, what = TARGETS[name]
        upper = name.startswith("rss_")
        found[name] = {"value": value, "target": f"{'<' if upper else '>='} {bound:g}", "what": what,
                       "met": value < bound if upper else value >= bound}
    for name, step in steps.items():
        if "rows_ok" in step:
            found[f"rows_{name}"] = {"value": step["rows"], "target": f"== {memory['rows']}", "met": step["rows_ok"],
                                     "what": f"rows in the {name} output"}
    return found


def print_report(results: dict) -> None:
    steps, baseline = results["steps"], results["steps"]["in_memory"]["rows_per_s"]
    m = results["machine"]
    load = ", ".join(f"{x:.1f}" for x in m["load_average_at_start"])
    print(f"\n{results['texts']:,} texts ({results['corpus']['format']}, mean {results['corpus']['mean_chars']:.0f} "
          f"chars), {m['cores']} core(s), load average at start {load}")
    header = (f"{'step':<12}{'rows':>11}{'seconds':>9}{'rows/s':>10}{'vs in-mem':>10}{'RSS MB':>9}{'PSS MB':>9}"
              f"{'max proc MB':>12}{'sum peaks MB':>13}{'procs':>6}")
    print(header)
    for name, step in steps.items():
        if "skipped" in step:
            print(f"{name:<12}  skipped: {step['skipped']}")
            continue
        rows = "?" if step["rows"] is None else f"{step['rows']:,}"
        seconds = step.get("seconds", step["wall_s"])
        print(f"{name:<12}{rows:>11}{seconds:>9.1f}{step['rows_per_s']:>10,.0f}{step['rows_per_s'] / baseline:>10.2f}"
              f"{step['peak_rss_mb']:>9,.0f}{step['peak_pss_mb']:>9,.0f}{step['largest_process_peak_rss_mb']:>12,.0f}"
              f"{step['sum_of_process_peaks_mb']:>13,.0f}{step['max_processes']:>6}")
    print("seconds: in_memory's is scoring time only (reading and model loading excluded), the others' the whole "
          "command's; RSS, PSS: peak of the tree's sum, sampled; max proc, sum peaks: the processes' own peaks")
    if "ray" in steps and "memory_note" in steps["ray"]:
        print(f"ray memory {steps['ray']['memory_note']}")
    for name, t in results["targets"].items():
        value = f"{t['value']:,.0f}" if name.startswith(("rss_", "rows_")) else f"{t['value']:.2f}"
        print(f"{'PASS' if t['met'] else 'FAIL'}  {t['what']}: {value} (target {t['target']})")
    if results["texts"] < 1_000_000:
        print(f"note: {results['texts']:,} texts is a smoke run, not a measurement; start-up dominates small runs")


def main(argv: list[str] | None = None) -> dict | None:
    options = parse_args(argv)
    if options.phase:  # a child process: one measurement, one JSON line
        print(json.dumps(in_memory_phase(options.bundle, options.corpus)))
        return None

    import onnxruntime
    import pyarrow

    from nlprnn.threads import available_cores

    options.bundle = str(Path(options.bundle).resolve())
    corpus, corpus_meta = ensure_corpus(options)
    logs = options.workdir / "logs"
    logs.mkdir(exist_ok=True)
    machine = {
        "cores": available_cores(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "pyarrow": pyarrow.__version__,
    }
    if machine["load_average_at_start"][0] > 0.5:
        print(f"warning: load average {machine['load_average_at_start'][0]:.1f}; timings need a quiet machine",
              flush=True)
    steps = {
        "in_memory": measure_in_memory(options, corpus, logs),
        "workers_1": measure_streaming(1, options, corpus, logs),
        "workers_2": measure_streaming(2, options, corpus, logs),
    }
    if options.ray:
        steps["ray"] = measure_ray(options, corpus, logs)
    results = {
        "texts": options.texts,
        "seed": options.seed,
        "bundle": options.bundle,
        "corpus": {"file": str(corpus), **corpus_meta},
        "rows_per_part": options.rows_per_part,
        "slice_texts": SLICE_TEXTS,
        "machine": machine,
        "steps": steps,
        "targets": check_targets(steps),
    }
    results["all_met"] = all(t["met"] for t in results["targets"].values())
    print_report(results)
    if options.json:
        options.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
