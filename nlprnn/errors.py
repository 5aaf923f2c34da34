"""Errors a user reads as one clear sentence, without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class ReportedError(Exception):
    """A failure reported as one line on stderr and `exit_status`; its message says what to do."""

    exit_status = 1


class UserError(ReportedError):
    """A mistake the user can fix (bad path, column, dataset name...). Its message says how."""

    exit_status = 2


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (libraries append whole reports), else its type's name."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@contextmanager
def exit_on_reported_error(prog: str) -> Iterator[None]:
    """Turn a `ReportedError` into one line on stderr and its exit status; anything else stays loud."""
    try:
        yield
    except ReportedError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_status) from None
