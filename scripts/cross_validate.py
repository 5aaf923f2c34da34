"""Cross-validate the default recipe against the TF-IDF + logistic-regression baseline, without the test split.

    .venv/bin/python scripts/cross_validate.py                          # the built-in datasets, 5 folds, seeds 1 2 3
    .venv/bin/python scripts/cross_validate.py --datasets bbc-news --folds 10 --seeds 1
    .venv/bin/python scripts/cross_validate.py --datasets "" --train_files reviews.csv --text_column review

One test split of a few hundred examples cannot tell the model and the baseline apart by half a point (on
bbc-news's 213 test articles one article is 0.47 points). Here each dataset's training and validation examples
are pooled (its test split is left out and never read) and dealt into k folds, stratified by label. Each fold
is held out once per seed: `python -m nlprnn.fit --data.train_file REST --data.test_file FOLD` trains the
default recipe on the other folds (carving its validation split from them, as it does for any training file)
and scores the held-out fold, and the baseline, trained on the same training examples, scores it too. Every
pooled example is thus scored once by each, per seed: nine times the examples of a 10% test split. Seeds change
the model's initialisation and dropout, not the folds (nor the batch order, which `data.split_seed` sets).

A local file (--train_files, with --text_column and --label_column) is read as `fit --data.train_file FILE`
reads it, and the test split fit would carve from it is left out the same way; its folds and runs are named by
its stem and a digest of its contents, so an edited file is compared afresh. Runs go one at a time; a run
whose metrics.json exists is read back (see accuracy_table.py, whose run handling this shares), so a stopped
comparison continues where it stopped.
The comparison goes to <out>/cross_validation.json and <out>/cross_validation.md and the console. Arguments
after `--` are passed to every fit run.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from accuracy_table import (DEFAULT_DATASETS, DEFAULT_SEEDS, OWN_FLAGS, ROOT, Row, check_distinct_seeds, check_not_given,
                            machine, run_once, slugify, span, split_passthrough, write_report)

PROG = "cross_validate"
FOLD_SEED = 1234  # fixed, like fit's split seed: the same data gives the same folds


def stratified_folds(labels: np.ndarray, k: int, seed: int = FOLD_SEED) -> np.ndarray:
    """Each example's fold, 0..k-1: every class in a seeded order, dealt round the folds.

    One deal runs on from class to class, so fold sizes differ by at most one and every class is
    spread as evenly as its count allows.
    """
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=np.int64)
    dealt = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members] = (dealt + np.arange(len(members))) % k
        dealt += len(members)
    return folds


def pooled_examples(source: dict[str, str]):
    """The training and validation examples of a data source, as an Arrow table (text, label name).

    `source` holds SourceSpec fields (`dataset` or `train_file` and columns): the splits are the ones fit makes.
    """
    import pyarrow as pa

    from nlprnn.data.sources import SourceSpec, load_splits
    from nlprnn.errors import UserError

    try:
        splits = load_splits(SourceSpec(**source))
    except UserError as err:
        raise SystemExit(f"{PROG}: error: {err}") from None
    names = np.array(splits["train"].features["label"].names, dtype=object)
    parts = [splits[split].with_format("arrow", columns=["text", "label"])[:] for split in ("train", "validation")]
    table = pa.concat_tables(parts)
    ids = table.column("label").to_numpy()
    return table.set_column(table.column_names.index("label"), "label", pa.array(names[ids], pa.string()))


def write_folds(source: dict[str, str], slug: str, k: int, folds_dir: Path) -> list[tuple[Path, Path, int]]:
    """(train file, held-out file, held-out examples) for each fold, written once as Parquet under folds_dir."""
    import pyarrow.parquet as pq

    from nlprnn.atomic import publishing

    target = folds_dir / f"{slug}-{k}folds"
    files = [(target / f"fold{i + 1}-train.parquet", target / f"fold{i + 1}-test.parquet") for i in range(k)]
    if not target.exists():
        table = pooled_examples(source)
        if table.num_rows < 2 * k:
            raise SystemExit(f"{PROG}: error: {slug} has {table.num_rows} pooled examples, too few for {k} folds")
        folds = stratified_folds(table.column("label").to_numpy(zero_copy_only=False), k)
        with publishing(target) as scratch:  # all the folds or none
            for i, (train, test) in enumerate(files):
                pq.write_table(table.filter(folds != i), scratch / train.name)
                pq.write_table(table.filter(folds == i), scratch / test.name)
    return [(train, test, pq.read_metadata(test).num_rows) for train, test in files]


def file_slug(path: Path, columns: dict[str, str]) -> str:
    """A local file's name in folder names: its stem and a digest of its bytes and the columns read, so that an
    edited file, or another file of the same name, gets its own folds and runs rather than reusing these."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    digest.update(repr(sorted(columns.items())).encode())
    return f"{slugify(path.stem)}-{digest.hexdigest()[:8]}"


def summarize(label: str, runs: list[dict]) -> dict:
    """Per seed, how many held-out examples the model and the baseline got right (every pooled example once);
    their mean accuracy and its spread over seeds; and in how many runs (a fold with a seed) the model was ahead,
    level or behind."""
    seeds = sorted({r["seed"] for r in runs})
    held_out = sum(r["held_out"] for r in runs if r["seed"] == seeds[0])

    def correct(key: str) -> list[int]:
        return [sum(round(r["metrics"][key] * r["held_out"]) for r in runs if r["seed"] == seed) for seed in seeds]

    def over_seeds(counts: list[int]) -> list[float | None]:
        accuracies = [count / held_out for count in counts]
        return [statistics.fmean(accuracies), statistics.stdev(accuracies) if len(accuracies) > 1 else None]

    model, baseline = correct("test_acc"), correct("baseline_test_acc")
    ahead = [round((r["metrics"]["test_acc"] - r["metrics"]["baseline_test_acc"]) * r["held_out"]) for r in runs]
    return {
        "row": label,
        "folds": len(runs) // len(seeds),
        "seeds": seeds,
        "held_out": held_out,
        "model_correct": model,
        "baseline_correct": baseline,
        "model_acc": over_seeds(model),
        "baseline_acc": over_seeds(baseline),
        "runs_ahead_level_behind": [sum(a > 0 for a in ahead), sum(a == 0 for a in ahead), sum(a < 0 for a in ahead)],
        "minutes_per_run": statistics.fmean(r["wall_s"] for r in runs) / 60 if all(r["wall_s"] for r in runs) else None,
        "trained": sorted({r["trained"] for r in runs}),
    }


def accuracy_cell(mean_std: list[float | None], counts: list[int]) -> str:
    """'97.4% (1,861)' when every seed got as many right, else '97.4 ± 0.1% (1,861 / 1,859 / 1,862)'."""
    mean, std = mean_std
    if len(set(counts)) == 1:
        return f"{100 * mean:.1f}% ({counts[0]:,})"
    return f"{100 * mean:.1f} ± {100 * std:.1f}% ({' / '.join(f'{c:,}' for c in counts)})"


def markdown_table(summaries: list[dict]) -> str:
    lines = [
        "| dataset | folds | seeds | held-out examples | model accuracy | TF-IDF + LR accuracy | difference "
        "| runs ahead / level / behind | minutes per run | trained |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in summaries:
        diff = f"{100 * (s['model_acc'][0] - s['baseline_acc'][0]):+.1f} pt".replace("-", "−")
        minutes = "–" if s["minutes_per_run"] is None else f"{s['minutes_per_run']:.1f}"
        lines.append(
            f"| {s['row']} | {s['folds']} | {', '.join(map(str, s['seeds']))} | {s['held_out']:,} | "
            f"{accuracy_cell(s['model_acc'], s['model_correct'])} | "
            f"{accuracy_cell(s['baseline_acc'], s['baseline_correct'])} | {diff} | "
            f"{' / '.join(map(str, s['runs_ahead_level_behind']))} | {minutes} | {span(s['trained'])} |")
    return "\n".join(lines) + "\n"


EXPLAINED = (
    "Each dataset's training and validation examples are pooled (its test split is never read) and dealt into "
    "folds stratified by label; each fold is held out once per seed, the default recipe (`python -m nlprnn.fit "
    "--data.train_file REST --data.test_file FOLD --seed_everything SEED`, which carves its validation split from "
    "REST and selects its checkpoint there) and the TF-IDF + logistic-regression baseline (`nlprnn/baseline.py`) "
    "are trained on the same examples and score it. Accuracy: over all held-out examples, each scored once per seed; "
    "mean ± sample standard deviation over seeds, and in brackets how many were right with each seed (one number "
    "when every seed got as many: the baseline depends on no seed). Difference: mean model accuracy minus the "
    "baseline's, in percentage points; runs ahead / level / behind: the runs (a fold with a seed) in which the model "
    "got more, as many, or fewer held-out examples right than the baseline; minutes: wall time of one fit run, runs "
    "one at a time; trained: the day(s) its runs wrote their metrics (a run whose folder holds them is read back, "
    "not trained again)."
)


def report(command: str, summaries: list[dict], info: dict) -> str:
    hardware = info["cuda"] or f"{info['cores']} CPU cores ({info['cpu']})"
    return (
        "# Cross-validation against the baseline\n\n"
        f"Generated by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d}, on {hardware}, torch {info['torch']}."
        "\n\n" + markdown_table(summaries) + f"\n{EXPLAINED}\n"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    argv, passthrough = split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=DEFAULT_DATASETS,
                        help="built-in datasets (--datasets '' for none)")
    parser.add_argument("--train_files", nargs="*", default=[], type=Path, help="local labelled files, one row each")
    parser.add_argument("--text_column", default="text", help="of the --train_files")
    parser.add_argument("--label_column", default="label", help="of the --train_files")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS,
                        help="fit's --seed_everything: every fold is held out once per seed")
    parser.add_argument("--out", type=Path, default=ROOT / "docs",
                        help="where cross_validation.json and cross_validation.md go")
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "checkpoints" / "cross-validation",
                        help="where the folds and the run folders go (and are found again when resuming)")
    args = parser.parse_args(argv)
    args.extra = passthrough
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    check_distinct_seeds(parser, args.seeds)
    check_not_given(parser, passthrough, (*OWN_FLAGS, "--data.train_file", "--data.validation_file",
                                          "--data.test_file", "--data.dataset"))
    for path in args.train_files:
        if not path.is_file():
            parser.error(f"file not found: {path}")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sources = [(name, name, {"dataset": name}) for name in args.datasets if name.strip()]
    columns = {"text_column": args.text_column, "label_column": args.label_column}
    sources += [(path.name, file_slug(path, columns), {"train_file": str(path.resolve()), **columns})
                for path in args.train_files]
    if not sources:
        raise SystemExit(f"{PROG}: error: nothing to run; give --datasets and/or --train_files")
    slugs = [slug for _, slug, _ in sources]
    if len(set(slugs)) < len(slugs):
        raise SystemExit(f"{PROG}: error: a dataset or file is given twice")
    import datasets

    datasets.disable_progress_bars()  # the per-fold lines are the output
    runs_dir = args.runs_dir.resolve()
    command = shlex.join(["python", "scripts/cross_validate.py", *argv])
    results, summaries = [], []
    for label, slug, source in sources:
        folds = write_folds(source, slug, args.folds, runs_dir / "folds")
        runs = []
        for seed in args.seeds:
            for fold, (train, test, held_out) in enumerate(folds, 1):
                row = Row(label, f"{slug}-fold{fold}of{args.folds}",
                          ("--data.train_file", str(train), "--data.test_file", str(test)))
                run = {"row": label, "fold": fold, "held_out": held_out, "seed": seed,
                       "run_dir": str(runs_dir / row.run_name(seed)),
                       **run_once(row, seed, runs_dir, args.extra, prog=PROG)}
                runs.append(run)
                m = run["metrics"]
                print(f"[{label} seed {seed}, fold {fold}/{args.folds}] {held_out} held out: "
                      f"model {m['test_acc']:.4f}, baseline {m['baseline_test_acc']:.4f}", flush=True)
        results += runs
        summaries.append(summarize(label, runs))
    info = machine()
    print("\n" + markdown_table(summaries) + "\n" + EXPLAINED)
    write_report(args.out, "cross_validation", {"command": command, "extra": args.extra, "folds": args.folds,
                                                "seeds": args.seeds, "machine": info, "rows": summaries,
                                                "runs": results},
                 report(command, summaries, info))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
