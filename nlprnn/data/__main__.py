"""python -m nlprnn.data list: the built-in datasets with their sizes and class balance."""

from __future__ import annotations

import argparse
import sys

from nlprnn.data.catalog import CATALOG, label_counts
from nlprnn.errors import exit_on_reported_error


def format_entry(name: str, counts: dict[str, int]) -> str:
    """`name  N examples  C classes  label share, ...` then the description on its own line."""
    total = sum(counts.values())
    balance = ", ".join(f"{label} {n / max(total, 1):.1%}" for label, n in counts.items())
    return f"{name:<16} {total:>7,} examples  {len(counts)} classes  {balance}\n{'':<16} {CATALOG[name].description}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nlprnn.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print the built-in datasets (fetching and caching any not yet cached)")
    parser.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()  # the listing is the output
    with exit_on_reported_error("nlprnn.data"):
        for name in CATALOG:
            print(format_entry(name, label_counts(name)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
