"""Command-line entry: a user's mistake (missing file, bad record) ends with one line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run(main: Callable[[], int]) -> int:
    try:
        return main()
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
