"""Spawn 1-4 gloo ranks on CPU for a test, with a file rendezvous under the test's tmp_path."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable, world_size: int, init_file: str, args: tuple) -> None:
    from gbcosface.distributed import exit_process, init_from_file, teardown

    torch.set_num_threads(1)
    # What a launcher would export; DeepSpeed insists on reading them even with a group in place.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    ctx = init_from_file(rank, world_size, init_file)
    try:
        fn(ctx, *args)
    except BaseException:
        # Print before tearing down: a failing rank may leave the others inside a collective,
        # and the group's destruction can then abort the process before spawn reports the error.
        traceback.print_exc()
        sys.stderr.flush()
        raise
    teardown(ctx)
    exit_process(0)  # see its docstring: no interpreter finalization with a gloo group alive


def run_ranks(fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any) -> None:
    """Run ``fn(ctx, *args)`` on ``world_size`` spawned gloo ranks; re-raise the first failure.

    ``fn`` must be a module-level function (spawn pickles it by name). Results come back through
    files the function writes under a path passed in ``args``.
    """
    init_file = Path(tmp_path) / f"rdzv-{os.getpid()}-{world_size}-{id(fn)}"
    if init_file.exists():
        init_file.unlink()
    mp.spawn(_entry, args=(fn, world_size, str(init_file), args), nprocs=world_size, join=True)
