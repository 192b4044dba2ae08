"""The one explicit distributed context.

This is the only module that reads the launcher's environment (torchrun, the ``deepspeed``
launcher, SLURM-started torchrun). Everything else is handed a :class:`DistContext` or a
process group, so it can be unit tested without one.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job, and where its tensors live.

    ``group`` is ``None`` in a single-process run: collectives are then skipped by callers.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: dist.ProcessGroup | None = None
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the rank that logs and writes shared files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.group is not None and self.world_size > 1

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)


def launcher_env(environ: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> dict:
    """Read rank, world size and local rank from the launcher's variables.

    torchrun and the deepspeed launcher both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT; older deepspeed launchers pass ``--local_rank`` on the command line instead of
    LOCAL_RANK, which callers hand over as ``local_rank_arg``. Returns ``{}`` when the process was
    not started by a launcher (a plain ``python`` run).
    """
    env = os.environ if environ is None else environ
    present = [k for k in _REQUIRED if k in env]
    if not present:
        return {}
    missing = [k for k in _REQUIRED if k not in env]
    if missing:
        raise RuntimeError(
            f"incomplete launcher environment: {', '.join(present)} set but {', '.join(missing)} "
            "missing; start the job with torchrun or deepspeed, or unset these variables"
        )
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        if "LOCAL_RANK" in env:
            local = int(env["LOCAL_RANK"])
        elif local_rank_arg is not None:
            local = int(local_rank_arg)
        else:
            local = rank
    except ValueError as exc:
        raise RuntimeError(f"launcher environment has a non-integer RANK/WORLD_SIZE/LOCAL_RANK: {exc}") from None
    if not 0 <= rank < world:
        raise RuntimeError(f"launcher environment: RANK={rank} is outside [0, WORLD_SIZE={world})")
    return {"rank": rank, "world_size": world, "local_rank": local}


def default_backend(device_type: str) -> str:
    """NCCL for CUDA tensors, gloo for CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(
    device: str | None = None,
    backend: str | None = None,
    timeout_s: float = 1800.0,
    local_rank_arg: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistContext:
    """Build the context from the launcher's environment, or a single-process one without it.

    ``device``: ``"cuda"`` / ``"cpu"`` / ``None`` (CUDA when available). ``backend``: ``None``
    picks NCCL on CUDA and gloo on CPU. ``timeout_s`` bounds every collective, so a rank that
    never joins ends the job with an error instead of a hang.
    """
    info = launcher_env(environ, local_rank_arg)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    local_rank = info.get("local_rank", 0)
    if device == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if not info or info["world_size"] == 1 and not dist.is_initialized():
        return DistContext(0, 1, local_rank, dev, None, None)

    backend = backend or default_backend(dev.type)
    if not dist.is_initialized():
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=info["rank"],
            world_size=info["world_size"],
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
    return DistContext(info["rank"], info["world_size"], local_rank, dev, dist.group.WORLD, backend)


def init_from_file(rank: int, world_size: int, init_file: str, backend: str = "gloo",
                   timeout_s: float = 120.0) -> DistContext:
    """A gloo context through a file rendezvous, for tests and tools that spawn their own ranks."""
    dist.init_process_group(
        backend=backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return DistContext(rank, world_size, rank, torch.device("cpu"), dist.group.WORLD, backend)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group this context created (no-op in a single process)."""
    if ctx.group is not None and dist.is_initialized():
        # Destroy together: a gloo rank whose peers already closed their pairs can abort
        # ("terminate called without an active exception") inside the destruction.
        dist.barrier(group=ctx.group)
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process that used a process group: flush, then leave without interpreter finalization.

    A gloo group object that is still referenced after ``destroy_process_group`` (by a
    DistContext, a head, a DDP wrapper) is destroyed during finalization, where its worker
    threads can abort the process ("terminate called without an active exception", SIGABRT; 6 of
    40 two-rank runs here) after all the work succeeded, and torchrun then reports the job
    failed. Leaving with ``os._exit`` skips that. Open files and TensorBoard writers must be
    flushed or closed before.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
