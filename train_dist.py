"""Train a face-recognition model with GB-CosFace (or CosFace/ArcFace) on a sharded classifier.

    torchrun --nproc_per_node=8 train_dist.py --config configs/ms1mv2_r100_gbcosface.toml
    deepspeed --num_gpus 8 train_dist.py --config configs/X.toml train.engine=deepspeed
    python train_dist.py --config configs/demo_cpu.toml optim.lr=0.05   (one process)

Trailing ``section.key=value`` arguments override the config file.

Exit codes (docs/RELIABILITY.md has the faults behind them):
    0  finished, or stopped on SIGTERM after a complete checkpoint (rerun the command to resume)
    1  an unexpected error (traceback)
    2  bad input: config, pre-flight checks (paths, disk, labels, checkpoint), a corrupt record
    3  too many non-finite losses in a row (a checkpoint of the last good step was written)
    4  the job could not form or lost a rank: rendezvous or collective timeout, peer gone
    5  SIGTERM, but no checkpoint within train.preempt_grace_s (the previous checkpoint stands)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

import torch

from gbcosface.config import ConfigError, load_config
from gbcosface.distributed import exit_process, init_distributed, launcher_env, teardown

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_NONFINITE, EXIT_DISTRIBUTED, EXIT_PREEMPT_LATE = 0, 1, 2, 3, 4, 5

log = logging.getLogger("gbcosface")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="TOML preset, e.g. configs/demo_cpu.toml")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; torchrun sets LOCAL_RANK instead")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


class PreemptionWatch:
    """SIGTERM (SLURM preemption, torchrun shutting down): stop at the next step, save, exit 0.

    The trainer's ``stop_requested`` is agreed on by all ranks in the step's all-reduce, so
    every rank stops at the same step and writes one checkpoint together. The grace timer runs
    in a thread woken through ``signal.set_wakeup_fd``, so it starts when the signal arrives
    even if the main thread is blocked inside a collective (Python runs signal handlers only
    between bytecodes of the main thread). When ``grace_s`` passes without the process having
    finished, it exits with ``EXIT_PREEMPT_LATE``: better a clear message now than a SIGKILL
    from the scheduler later; the newest complete checkpoint is still the one to resume from.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.requested = threading.Event()
        self.done = threading.Event()
        self.trainer = None
        self.rank = 0
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the watcher thread does the work
        signal.set_wakeup_fd(write_fd)
        threading.Thread(target=self._watch, args=(read_fd,), name="preemption-watch", daemon=True).start()

    def attach(self, trainer, rank: int) -> None:
        self.trainer, self.rank = trainer, rank
        if self.requested.is_set():
            trainer.stop_requested = True

    def _watch(self, read_fd: int) -> None:
        while signal.SIGTERM not in os.read(read_fd, 64):
            pass
        self.requested.set()
        if self.trainer is not None:
            self.trainer.stop_requested = True
        log.warning("SIGTERM: checkpoint at the next step, then exit (grace %g s)", self.grace_s)
        if self.done.wait(self.grace_s):
            return
        print(f"error: rank {self.rank}: SIGTERM, but no checkpoint within train.preempt_grace_s = "
              f"{self.grace_s:g} s (a step, a save or a peer rank is slower than that); exiting without a new "
              "checkpoint: the newest complete one stands, rerun to resume from it", file=sys.stderr, flush=True)
        os._exit(EXIT_PREEMPT_LATE)


def _exit_now(code: int) -> NoReturn:
    """Leave without the process group's orderly teardown: after a failure the other ranks may
    be inside a different collective (or gone), and a barrier would wait for train.timeout_s.
    Closing the sockets makes the peers' pending collectives fail at once instead."""
    exit_process(code)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    watch = PreemptionWatch(cfg.train.preempt_grace_s)
    try:  # the launcher's variables and the device first: mistakes there are the user's to fix
        launcher_env(local_rank_arg=args.local_rank)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    try:
        ctx = init_distributed(device=args.device, timeout_s=cfg.train.timeout_s, local_rank_arg=args.local_rank)
    except RuntimeError as exc:  # the c10d store or the backend's connections
        first = str(exc).strip().splitlines()[0]
        print(f"error: the process group did not form within train.timeout_s = {cfg.train.timeout_s:g} s ({first}). "
              "Check that every rank of the job was started (all nodes), that MASTER_ADDR:MASTER_PORT is reachable "
              "from every node, and that WORLD_SIZE matches the number of ranks; under torchrun --max-restarts "
              "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/RELIABILITY.md)", file=sys.stderr)
        return EXIT_DISTRIBUTED
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {ctx.rank}] %(levelname)s %(message)s")
    from gbcosface.checkpoint import CheckpointError
    from gbcosface.trainer import DataError, DistributedJobError, NonFiniteLossError, Trainer, summarize

    trainer = None
    try:
        trainer = Trainer(cfg, ctx)
        watch.attach(trainer, ctx.rank)
        result = trainer.fit()
        watch.done.set()
    except ConfigError as exc:  # the pre-flight verdict: the same on every rank, so one prints it
        if ctx.is_main:
            print(f"error: {exc}", file=sys.stderr)
        teardown(ctx)
        return EXIT_INPUT
    except NonFiniteLossError as exc:  # agreed on by every rank, after a checkpoint
        if ctx.is_main:
            print(f"error: {exc}", file=sys.stderr)
        teardown(ctx)
        return EXIT_NONFINITE
    except (DataError, CheckpointError) as exc:
        print(f"error: rank {ctx.rank}: {exc}", file=sys.stderr)
        _exit_now(EXIT_INPUT)
    except DistributedJobError as exc:
        print(f"error: rank {ctx.rank}: {exc}", file=sys.stderr)
        _exit_now(EXIT_DISTRIBUTED)
    except BaseException:
        import traceback

        traceback.print_exc()
        _exit_now(EXIT_ERROR)
    if ctx.is_main:
        print(summarize(result, cfg.tensorboard_dir if cfg.log.tensorboard else None))
        if result["status"] == "stop requested":
            print(f"stopped on request at step {result['step']} with a complete checkpoint; rerun the same "
                  "command to resume")
        print(f"output: {cfg.train.output} (checkpoints in {cfg.checkpoint_dir}, backbone in model.pt)")
    teardown(ctx)
    return EXIT_OK


if __name__ == "__main__":
    exit_process(main())
