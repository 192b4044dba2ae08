"""A progress line for long loops, printed every N seconds or N items, without tqdm.

Training logs are often read from a SLURM output file, where a redrawn bar turns into
thousands of carriage returns; a plain line every few seconds reads well in both places.
Rank 0 builds an enabled reporter; other ranks build a disabled one, which prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (days folded into hours), the form people read at a glance."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Counts items towards ``total`` and prints a line with rate and ETA now and then.

    A line is printed when ``every_s`` seconds or ``every_n`` items have passed since the last
    one (whichever is set and comes first), and always on the last item. ``clock`` is
    injectable so tests do not depend on real time.
    """

    def __init__(
        self,
        total: int | None,
        *,
        desc: str = "",
        unit: str = "it",
        every_s: float = 10.0,
        every_n: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        initial: int = 0,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.every_s = every_s
        self.every_n = every_n
        self.enabled = enabled
        self.stream = stream
        self.clock = clock
        self.count = initial
        self._start_count = initial
        self._start = clock()
        self._last_time = self._start
        self._last_count = initial

    def update(self, n: int = 1, **fields: object) -> None:
        """Advance by ``n`` items; ``fields`` (loss, lr, ...) are shown on the printed line."""
        self.count += n
        if not self.enabled:
            return
        now = self.clock()
        finished = self.total is not None and self.count >= self.total
        due_time = self.every_s > 0 and now - self._last_time >= self.every_s
        due_items = self.every_n > 0 and self.count - self._last_count >= self.every_n
        if finished or due_time or due_items:
            self._emit(now, fields)

    def wrap(self, batches: Iterable[Sized]) -> Iterator[Sized]:
        """Yield ``batches`` unchanged, counting ``len(batch)`` items after each."""
        for batch in batches:
            yield batch
            self.update(len(batch))

    def line(self, now: float, fields: dict[str, object]) -> str:
        """The text of one progress line at time ``now`` (no newline)."""
        elapsed = now - self._start
        done = self.count - self._start_count
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [self.desc] if self.desc else []
        if self.total:
            parts.append(f"{self.count}/{self.total} ({100.0 * self.count / self.total:.1f}%)")
        else:
            parts.append(str(self.count))
        parts.extend(f"{key} {_format_value(value)}" for key, value in fields.items())
        parts.append(f"{rate:.1f} {self.unit}/s")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if self.total and rate > 0:
            parts.append(f"ETA {format_duration(max(0, self.total - self.count) / rate)}")
        return " | ".join(parts)

    def _emit(self, now: float, fields: dict[str, object]) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(self.line(now, fields), file=stream, flush=True)
        self._last_time = now
        self._last_count = self.count
