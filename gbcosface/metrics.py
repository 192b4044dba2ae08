"""What a run reports: TensorBoard scalars from rank 0, throughput, and memory.

Every rank gets a logger from :func:`make_logger`; only rank 0's writes anything, the others
get a no-op with the same methods, so training code logs unconditionally instead of testing
the rank at each call.
"""

from __future__ import annotations

import collections
import resource
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from gbcosface.distributed import DistContext

Number = float | int | torch.Tensor


class ScalarLogger(Protocol):
    def scalar(self, tag: str, value: Number, step: int) -> None: ...
    def scalars(self, values: Mapping[str, Number], step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class TensorBoardLogger:
    """Scalars into a TensorBoard event file under ``log_dir`` (one flat tag per value)."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def scalar(self, tag: str, value: Number, step: int) -> None:
        self._writer.add_scalar(tag, float(value), global_step=step)

    def scalars(self, values: Mapping[str, Number], step: int) -> None:
        # add_scalar per tag rather than SummaryWriter.add_scalars, which opens one event
        # file per tag in sub-folders and makes runs awkward to compare.
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class NullLogger:
    """The logger of every rank but 0, and of runs with TensorBoard off: does nothing."""

    def scalar(self, tag: str, value: Number, step: int) -> None:
        pass

    def scalars(self, values: Mapping[str, Number], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_logger(ctx: DistContext, log_dir: str | Path | None) -> ScalarLogger:
    """A TensorBoard logger on rank 0 when ``log_dir`` is given; a no-op otherwise."""
    if ctx.is_main and log_dir is not None:
        return TensorBoardLogger(log_dir)
    return NullLogger()


class Throughput:
    """Items per second over the last ``window`` updates.

    A window, not the whole run, so the figure reflects the current speed after warm-up,
    evaluation pauses or a resume. On CUDA the clock runs ahead of queued kernels for a step or
    two; over a window of steps that skew averages out without a synchronisation per step.
    """

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter) -> None:
        if window < 1:
            raise ValueError(f"Throughput: window must be >= 1, got {window}")
        self.clock = clock
        self._marks: collections.deque[tuple[float, int]] = collections.deque(maxlen=window + 1)

    def start(self) -> None:
        """Forget the past and start timing now (after a pause such as evaluation)."""
        self._marks.clear()
        self._marks.append((self.clock(), 0))

    def update(self, count: int) -> None:
        """``count`` items finished since the previous update (pass the global batch for the job's rate).

        Without a :meth:`start`, the first update only starts the clock: the time its items took
        is unknown.
        """
        if not self._marks:
            self.start()
            return
        self._marks.append((self.clock(), count))

    def rate(self) -> float:
        """Items per second over the window; 0.0 before the first completed interval."""
        if len(self._marks) < 2:
            return 0.0
        elapsed = self._marks[-1][0] - self._marks[0][0]
        items = sum(count for _, count in list(self._marks)[1:])
        return items / elapsed if elapsed > 0 else 0.0


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB, as TensorBoard tags: CUDA allocator peaks on a CUDA device, and the
    process's peak resident set size everywhere (the figure that matters on CPU)."""
    stats: dict[str, float] = {}
    if device.type == "cuda":
        stats["memory/cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        stats["memory/cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    stats["memory/max_rss_gib"] = peak / (2**30 if sys.platform == "darwin" else 2**20)
    return stats
