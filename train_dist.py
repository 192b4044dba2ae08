"""Train a face-recognition model with GB-CosFace (or CosFace/ArcFace) on a sharded classifier.

    torchrun --nproc_per_node=8 train_dist.py --config configs/ms1mv2_r100_gbcosface.toml
    deepspeed --num_gpus 8 train_dist.py --config configs/X.toml train.engine=deepspeed
    python train_dist.py --config configs/demo_cpu.toml optim.lr=0.05   (one process)

Trailing ``section.key=value`` arguments override the config file.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from gbcosface.config import ConfigError, load_config
from gbcosface.distributed import init_distributed, teardown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="TOML preset, e.g. configs/demo_cpu.toml")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; torchrun sets LOCAL_RANK instead")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ctx = init_distributed(device=args.device, timeout_s=cfg.train.timeout_s, local_rank_arg=args.local_rank)
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {ctx.rank}] %(levelname)s %(message)s")
    from gbcosface.trainer import Trainer, summarize

    try:
        try:
            trainer = Trainer(cfg, ctx)
        except ConfigError as exc:
            if ctx.is_main:
                print(f"error: {exc}", file=sys.stderr)
            return 2

        def request_stop(signum, frame):
            trainer.stop_requested = True
            logging.getLogger("gbcosface").warning("signal %d: checkpoint at the next step, then exit", signum)

        signal.signal(signal.SIGTERM, request_stop)
        result = trainer.fit()
        if ctx.is_main:
            print(summarize(result, cfg.tensorboard_dir if cfg.log.tensorboard else None))
            print(f"output: {cfg.train.output} (checkpoints in {cfg.checkpoint_dir}, backbone in model.pt)")
    finally:
        teardown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
