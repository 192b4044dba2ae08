"""The sharded GB-CosFace loss on random embeddings, across the ranks torchrun started.

    torchrun --standalone --nproc_per_node=2 -m gbcosface.demo_loss

Each rank owns a slice of the classifier's rows and a batch of free embeddings; a few SGD steps
on both show the loss falling and the global boundary moving, identical on every rank.
"""

from __future__ import annotations

import argparse
import time

import torch

from gbcosface.distributed import DistContext, exit_process, init_distributed, teardown
from gbcosface.head import ShardedHead
from gbcosface.losses import GBCosFace


def run(ctx: DistContext, num_classes: int, dim: int, batch: int, steps: int, seed: int) -> list[dict]:
    """Train free embeddings against the sharded head; returns rank-identical per-step stats."""
    gen = torch.Generator().manual_seed(seed + ctx.rank)
    embeddings = torch.randn(batch, dim, generator=gen).to(ctx.device).requires_grad_(True)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(ctx.device)
    head = ShardedHead(GBCosFace(), dim, num_classes, group=ctx.group, seed=seed).to(ctx.device)
    opt = torch.optim.SGD([embeddings, *head.parameters()], lr=0.05, momentum=0.9)
    history = []
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = head(embeddings, labels)
        loss.backward()
        opt.step()
        stats = {k: float(v) for k, v in head.last_stats.items()}
        stats["boundary_state"] = float(head.margin_loss.boundary)
        history.append(stats)
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1001, help="number of classes (uneven shards on purpose)")
    parser.add_argument("--dim", type=int, default=64, help="embedding size")
    parser.add_argument("--batch", type=int, default=32, help="samples per rank")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)

    ctx = init_distributed(device=args.device)
    try:
        t0 = time.perf_counter()
        history = run(ctx, args.classes, args.dim, args.batch, args.steps, args.seed)
        elapsed = time.perf_counter() - t0
        if ctx.is_main:
            print(
                f"GB-CosFace on {ctx.world_size} rank(s) ({ctx.backend or 'no process group'}), "
                f"{args.classes} classes sharded, global batch {args.batch * ctx.world_size}"
            )
            print(f"{'step':>5} {'loss':>9} {'pos':>8} {'neg':>8} {'mean p_y':>9} {'mean p_n':>9} {'boundary':>9}")
            for step, h in enumerate(history, 1):
                if step == 1 or step % 5 == 0 or step == len(history):
                    print(
                        f"{step:5d} {h['loss']:9.4f} {h['loss_pos']:8.4f} {h['loss_neg']:8.4f} "
                        f"{h['p_y']:9.4f} {h['p_n']:9.4f} {h['boundary_state']:9.4f}"
                    )
            rate = len(history) * args.batch * ctx.world_size / elapsed
            print(f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}; "
                  f"boundary {history[-1]['boundary_state']:.4f}; {rate:.0f} samples/s")
    finally:
        teardown(ctx)
    return 0


if __name__ == "__main__":
    exit_process(main())
