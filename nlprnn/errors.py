"""User-facing errors: one clear sentence, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A mistake the user can fix (bad path, column, dataset name...). Its message says how."""


@contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """Turn a `UserError` into one line on stderr and exit status 2; anything else stays loud."""
    try:
        yield
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
