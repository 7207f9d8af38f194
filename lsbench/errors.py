"""The one exception type lsbench raises for bad user input; the CLI prints it in one line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class LsbenchError(Exception):
    """A problem the user can fix (bad model id, layer out of range, corrupt file...)."""


def one_line(text: object, limit: int = 300) -> str:
    """A library's message folded onto one line and capped, for an error line of our own."""
    flat = " ".join(str(text).split()) or type(text).__name__
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def run_main(entry: Callable[[], int | None]) -> NoReturn:
    """A `python -m lsbench....` script's `__main__`: bad input is one `error:` line and exit
    status 1, never a traceback; otherwise the entry's exit status."""
    try:
        code = entry()
    except LsbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)
