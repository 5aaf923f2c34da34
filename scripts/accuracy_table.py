"""Regenerate the README's accuracy table: every dataset or recipe, trained over several seeds, one command.

    .venv/bin/python scripts/accuracy_table.py                       # the built-in datasets, seeds 1 2 3
    .venv/bin/python scripts/accuracy_table.py --datasets "" --recipes configs/trec6.yaml configs/sms_spam.yaml
    .venv/bin/python scripts/accuracy_table.py --extra="--trainer.max_epochs 3"

Each row is a built-in dataset run with the default recipe (`--data.dataset NAME`) or a recipe
(`--config FILE`); each is trained once per seed by `python -m nlprnn.fit`, one run at a time (runs in
parallel would share the cores and distort the wall times). Every run's numbers go to
<out>/accuracy.json and the table, mean ± sample standard deviation over seeds, to <out>/accuracy.md.

The run folders stay under --runs_dir. A run whose metrics.json is already there is not run again, so a
stopped generation continues where it stopped; a folder without metrics.json (a run that was killed) is
removed and that run starts over, so every number comes from one uninterrupted run. A failed run stops the
script with the end of its stderr. Arguments after `--` are passed to every run, like --extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASETS = ["movie-snippets", "trec6", "sms-spam", "bbc-news"]
DEFAULT_SEEDS = [1, 2, 3]
RUN_RECORD = "accuracy_run.json"  # beside a run's metrics.json: its wall time, command and code version
# set by the script for each run: given again after `--` (or in --extra) they would make the seeds one, or send the
# run's metrics elsewhere
OWN_FLAGS = ("--seed_everything", "--run_name", "--output_dir", "--baseline")
STDERR_TAIL_LINES = 40
TEST_USE = (
    "Each run selects its checkpoint on the validation split (the epoch with the best validation accuracy; among "
    "epochs tied on it, the lowest validation loss; with a linear blend, the network's own figures); "
    "the test split is read once per run, at the end, by that checkpoint, and by the baseline. "
    "Seeds change the initialisation and dropout; the data split and the batch order (which follows "
    "`data.split_seed` and the epoch) are the same for every seed."
)


@dataclass(frozen=True)
class Row:
    """One line of the table: a built-in dataset under the default recipe, or a recipe file."""

    label: str  # as shown in the table
    slug: str  # as part of run folder names
    args: tuple[str, ...]  # what selects it on the fit command line

    def run_name(self, seed: int) -> str:
        return f"{self.slug}-seed{seed}"


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def rows_from(datasets: list[str], recipes: list[str]) -> list[Row]:
    rows = [Row(name, slugify(name), ("--data.dataset", name)) for name in datasets if name.strip()]
    for recipe in recipes:
        path = Path(recipe)
        if not path.is_file():
            raise SystemExit(f"accuracy_table: error: recipe not found: {recipe}")
        rows.append(Row(path.name, "recipe-" + slugify(path.stem), ("--config", str(path))))
    slugs = [row.slug for row in rows]
    duplicated = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicated:
        raise SystemExit(f"accuracy_table: error: two rows would share run folders: {', '.join(duplicated)}")
    if not rows:
        raise SystemExit("accuracy_table: error: nothing to run; give --datasets and/or --recipes")
    return rows


def fit_command(row: Row, seed: int, runs_dir: Path, extra: list[str]) -> list[str]:
    # --config must come first: fit adds configs/default.yaml only when none is named, and later flags win.
    return [
        sys.executable, "-m", "nlprnn.fit", *row.args,
        "--seed_everything", str(seed), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--run_name", row.run_name(seed), "--output_dir", str(runs_dir), *extra,
    ]


def run_once(row: Row, seed: int, runs_dir: Path, extra: list[str], prog: str = "accuracy_table") -> dict:
    """The numbers of one run: read back if it is done, trained (and timed) if not. `prog` names the caller
    in errors."""
    run_dir = runs_dir / row.run_name(seed)
    metrics_file, record_file = run_dir / "metrics.json", run_dir / RUN_RECORD
    command = fit_command(row, seed, runs_dir, extra)
    if metrics_file.exists():
        record = json.loads(record_file.read_text()) if record_file.exists() else {}
        if record.get("command") != shlex.join(command):  # its numbers would stand for another command's
            trained_by = f"another command: {record['command']}" if "command" in record else "an unrecorded command"
            raise SystemExit(f"{prog}: error: {run_dir} was trained by {trained_by}; delete it to train this one, "
                             "or give another --runs_dir")
        if record.get("code") != code_version():
            print(f"  note: {run_dir} was trained with the code at {record.get('code', 'an unrecorded version')}, "
                  f"not {code_version()}; delete it to train it again", flush=True)
        return {**record, **finished(metrics_file, prog), "reused": True}
    if run_dir.exists():
        print(f"  {run_dir} has no metrics.json (a stopped run): starting it over", flush=True)
        shutil.rmtree(run_dir)
    logs = runs_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stdout_log, stderr_log = logs / f"{row.run_name(seed)}.out", logs / f"{row.run_name(seed)}.err"
    # Relative paths in recipes and --extra mean what they mean here; nlprnn is found even when not installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with stdout_log.open("w") as out, stderr_log.open("w") as err:
        proc = subprocess.run(command, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    wall_s = time.perf_counter() - start
    if proc.returncode != 0 or not metrics_file.exists():
        tail = "\n".join(stderr_log.read_text(errors="replace").splitlines()[-STDERR_TAIL_LINES:])
        print(f"{tail}\n{prog}: error: {shlex.join(command)} failed with status {proc.returncode} "
              f"(full output: {stdout_log}, {stderr_log})", file=sys.stderr)
        raise SystemExit(proc.returncode or 1)
    record = {"wall_s": wall_s, "command": shlex.join(command), "code": code_version()}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return {**record, **finished(metrics_file, prog), "reused": False}


def finished(metrics_file: Path, prog: str) -> dict:
    """A run's test metrics and the day they were written: a reused run keeps the day it was trained."""
    metrics = json.loads(metrics_file.read_text())
    if "baseline_test_acc" not in metrics:  # fit leaves the baseline out with a warning when it fails
        raise SystemExit(f"{prog}: error: {metrics_file} holds no baseline figures (see the run's log for why); "
                         "delete its run folder to train it again")
    written = datetime.fromtimestamp(metrics_file.stat().st_mtime, timezone.utc)
    return {"metrics": metrics, "trained": f"{written:%Y-%m-%d}"}


def code_version() -> str:
    """The commit the code is at, marked when the work tree differs from it: what a run was trained with."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def mean(values: list[float | None]) -> float | None:
    """The mean, or None when any value is missing (a run without the baseline, or without a recorded time)."""
    return None if not values or None in values else statistics.fmean(values)


def summarize(label: str, runs: list[dict]) -> dict:
    """Mean (and sample std) over seeds of the numbers the table shows."""
    acc = [r["metrics"]["test_acc"] for r in runs]
    wall_s = mean([r["wall_s"] for r in runs])
    return {
        "row": label,
        "seeds": [r["seed"] for r in runs],
        "test_acc_mean": statistics.fmean(acc),
        "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else None,
        "test_f1_macro_mean": statistics.fmean(r["metrics"]["test_f1_macro"] for r in runs),
        "baseline_test_acc_mean": mean([r["metrics"].get("baseline_test_acc") for r in runs]),
        "baseline_test_f1_macro_mean": mean([r["metrics"].get("baseline_test_f1_macro") for r in runs]),
        "minutes_per_run": None if wall_s is None else wall_s / 60,
        "trained": sorted({r["trained"] for r in runs}),
        "code": sorted({r.get("code", "unrecorded") for r in runs}),
    }


def markdown_table(summaries: list[dict]) -> str:
    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}%"

    lines = [
        "| dataset / recipe | runs | test accuracy | macro-F1 | TF-IDF + LR accuracy | difference | minutes per run "
        "| trained | code |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for s in summaries:
        acc = pct(s["test_acc_mean"])
        if s["test_acc_std"] is not None:
            acc = f"{100 * s['test_acc_mean']:.1f} ± {100 * s['test_acc_std']:.1f}%"
        baseline = s["baseline_test_acc_mean"]
        diff = "–" if baseline is None else f"{100 * (s['test_acc_mean'] - baseline):+.1f} pt".replace("-", "−")
        minutes = "–" if s["minutes_per_run"] is None else f"{s['minutes_per_run']:.1f}"
        lines.append(f"| {s['row']} | {len(s['seeds'])} | {acc} | {s['test_f1_macro_mean']:.3f} | {pct(baseline)} | "
                     f"{diff} | {minutes} | {span(s['trained'])} | {', '.join(s['code'])} |")
    return "\n".join(lines) + "\n"


def span(days: list[str]) -> str:
    """Sorted days as shown in a table: the one day, or the first to the last."""
    return days[0] if days[0] == days[-1] else f"{days[0]} to {days[-1]}"


def machine() -> dict:
    import torch

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def report(command: str, seeds: list[int], summaries: list[dict], info: dict) -> str:
    hardware = info["cuda"] or f"{info['cores']} CPU cores ({info['cpu']})"
    seed_text = ", ".join(map(str, seeds))
    return (
        "# Test accuracy over seeds\n\n"
        f"Generated by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d}, on {hardware}, torch {info['torch']}.\n\n"
        + markdown_table(summaries)
        + f"\nTest accuracy: mean ± sample standard deviation over seeds {seed_text} (`--seed_everything`), in %; "
        "macro-F1 and the TF-IDF + logistic-regression baseline (`nlprnn/baseline.py`, on the same splits): means; "
        "difference: the model's mean test accuracy minus the baseline's, in percentage points; minutes: wall time of "
        "one `python -m nlprnn.fit` run, data preparation included, runs one at a time; trained: the day(s) its runs "
        "wrote their test metrics (a row whose run folders exist is read back, not trained again); code: the commit "
        "the runs were trained at (`+changes`: with uncommitted changes).\n\n"
        f"{TEST_USE}\n"
    )


def write_report(out: Path, stem: str, record: dict, markdown: str) -> None:
    """<out>/<stem>.json (`record`, with the time it was written) and <out>/<stem>.md (`markdown`)."""
    out.mkdir(parents=True, exist_ok=True)
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (out / f"{stem}.json").write_text(json.dumps({**record, "generated": generated}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(f"wrote {out / f'{stem}.md'} and {out / f'{stem}.json'}")


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the script's own arguments, those after `--`, which go to every fit run)."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def check_distinct_seeds(parser: argparse.ArgumentParser, seeds: list[int]) -> None:
    """End the command with one line when a seed is given twice: its run would count twice in the mean and spread."""
    if len(set(seeds)) < len(seeds):
        parser.error("--seeds holds a seed twice")


def check_not_given(parser: argparse.ArgumentParser, extra: list[str], flags: tuple[str, ...]) -> None:
    """End the command with one line when the fit arguments set what the script sets for each run."""
    given = sorted({flag for arg in extra for flag in flags if arg == flag or arg.startswith(flag + "=")})
    if given:
        parser.error(f"the script sets {', '.join(given)} for each run: leave it out of the fit arguments")


def parse_args(argv: list[str]) -> argparse.Namespace:
    argv, passthrough = split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=DEFAULT_DATASETS,
                        help="built-in datasets, each trained with the default recipe (--datasets '' for none)")
    parser.add_argument("--recipes", nargs="*", default=[], help="recipe files (configs/*.yaml), one row each")
    parser.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS, help="seeds of every row")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where accuracy.json and accuracy.md go")
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "checkpoints" / "accuracy-table",
                        help="where the run folders go (and are found again when resuming)")
    parser.add_argument("--extra", default="",
                        help='arguments for every fit run, as one string: --extra="--trainer.max_epochs 3"')
    args = parser.parse_args(argv)
    check_distinct_seeds(parser, args.seeds)
    args.extra = shlex.split(args.extra) + passthrough
    check_not_given(parser, args.extra, OWN_FLAGS)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    rows = rows_from(args.datasets, args.recipes)
    runs_dir = args.runs_dir.resolve()
    command = shlex.join(["python", "scripts/accuracy_table.py", *argv])
    total, done, results = len(rows) * len(args.seeds), 0, []
    for row in rows:
        for seed in args.seeds:
            done += 1
            run = {"row": row.label, "seed": seed, "run_dir": str(runs_dir / row.run_name(seed)),
                   **run_once(row, seed, runs_dir, args.extra)}
            results.append(run)
            minutes = "" if run["wall_s"] is None else f", {run['wall_s'] / 60:.1f} min"
            state = "already done" if run["reused"] else f"trained{minutes}"
            print(f"[{done}/{total}] {row.label} seed {seed}: test accuracy {run['metrics']['test_acc']:.4f} "
                  f"({state})", flush=True)
    summaries = [summarize(row.label, [r for r in results if r["row"] == row.label]) for row in rows]
    info = machine()
    print("\n" + markdown_table(summaries) + "\n" + TEST_USE)
    write_report(args.out, "accuracy", {"command": command, "extra": args.extra, "seeds": args.seeds, "machine": info,
                                        "rows": summaries, "runs": results},
                 report(command, args.seeds, summaries, info))


if __name__ == "__main__":
    main()
