"""Per-rank memory and collective bytes of one head step at world sizes 1, 2, 4 (gloo, loopback).

    python benchmarks/bench_dist.py                         # C = 100k and 200k, N = 256
    python benchmarks/bench_dist.py --classes 400000 --worlds 1,2,4 --chunk-size 2048

The global batch N and the global class count C are fixed while the world size W grows, so the
expected shape is: per-rank memory ~ (2 D + N) * 4 bytes * C / W (weight, its gradient and the
``[N, C/W]`` cosine block; ``(2 D) * 4 * C / W`` plus tiles with ``--chunk-size``), and collective
bytes per step O(N), the same for every C.

Collective bytes are counted by wrapping ``torch.distributed.all_gather``, ``reduce_scatter``
and ``all_reduce`` (the calls :mod:`gbcosface.collectives` makes) and adding up the tensors
passed: ``payload`` is what this rank contributes (its all-gather input, its reduce-scatter
inputs, its all-reduce buffer), ``ring`` is what a ring algorithm sends per rank for it
((W-1) x input for all-gather, (W-1)/W x input for reduce-scatter, 2 (W-1)/W x buffer for
all-reduce). These are computed from the tensors, not sniffed on the wire; gloo may pick another
algorithm for small buffers. ``check_inputs`` (one tiny all-gather per step) is left on, as users
run it. Peak memory is the rank's high-water RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` once the process group is up and a tiny head has made one step, so
library buffers are already there) minus its RSS at that moment, over the head's construction
and one step, with glibc's mmap threshold fixed at 128 KiB (freed tensors go back to the kernel
at once; see bench_head.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _count_collectives(world: int, tally: dict) -> None:
    """Wrap the torch.distributed calls gbcosface.collectives uses, adding bytes to ``tally``."""
    import torch.distributed as dist

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    def wrap(name, payload, ring_factor):
        inner = getattr(dist, name)

        def counted(*args, **kwargs):
            size = payload(*args)
            entry = tally.setdefault(name, {"calls": 0, "payload": 0, "ring": 0.0})
            entry["calls"] += 1
            entry["payload"] += size
            entry["ring"] += size * ring_factor
            return inner(*args, **kwargs)

        setattr(dist, name, counted)

    wrap("all_gather", lambda outs, inp, *a: nbytes(inp), world - 1)
    wrap("reduce_scatter", lambda out, inps, *a: sum(nbytes(t) for t in inps), (world - 1) / world)
    wrap("all_reduce", lambda t, *a: nbytes(t), 2 * (world - 1) / world)


def rank_main(rank: int, world: int, init_file: str, out_dir: str, classes: int, n: int, dim: int,
              chunk: int | None) -> None:
    import torch

    from gbcosface.distributed import init_from_file, teardown
    from gbcosface.head import ShardedHead
    from gbcosface.losses import GBCosFace

    torch.set_num_threads(1)
    ctx = init_from_file(rank, world, init_file)
    tally: dict = {}
    b = n // world
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(b, dim, generator=gen, requires_grad=True)
    labels = torch.randint(0, classes, (b,), generator=gen)
    warm = ShardedHead(GBCosFace(), dim, 64 * world, group=ctx.group)
    warm(torch.randn(2, dim, requires_grad=True), torch.tensor([0, 1])).backward()
    del warm
    ctx.barrier()
    base_kb = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    head = ShardedHead(GBCosFace(), dim, classes, group=ctx.group, chunk_size=chunk)
    _count_collectives(world, tally)
    head(x, labels).backward()
    peak_mb = (_status_kb("VmHWM") - base_kb) / 1024
    result = {"rank": rank, "num_local": head.num_local, "peak_mb": peak_mb, "collectives": tally}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    teardown(ctx)


def run_world(world: int, classes: int, args) -> list[dict]:
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # read by each spawned rank at start-up
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        mp.spawn(rank_main, args=(world, str(Path(tmp, "rdzv")), tmp, classes, args.batch, args.dim, args.chunk_size),
                 nprocs=world, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def predicted(world: int, classes: int, args) -> tuple[float, float]:
    """(per-rank MB for weight + grad + block or tiles, collective payload bytes per rank)."""
    rows = -(-classes // world)
    cols = args.batch if args.chunk_size is None else 0
    mem = rows * (2 * args.dim + cols) * 4 / 2**20
    if world == 1:
        return mem, 0.0
    b = args.batch // world
    # embeddings (all-gather) + labels (all-gather, int64) + embedding grad (reduce-scatter, N x D)
    # + MAX [N] + SUM [2, N] + boundary mean [1] + check_inputs [6] float64 (all-gather)
    payload = b * args.dim * 4 + b * 8 + args.batch * args.dim * 4 + args.batch * 4 + 2 * args.batch * 4 + 4 + 48
    return mem, float(payload)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", default="100000,200000", help="global class counts, comma separated")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--batch", type=int, default=256, help="global batch N")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--csv", default="bench_dist.csv")
    p.add_argument("--markdown", help="also write the table here")
    args = p.parse_args(argv)

    rows = []
    for classes in (int(c) for c in args.classes.split(",")):
        for world in (int(w) for w in args.worlds.split(",")):
            ranks = run_world(world, classes, args)
            mem_pred, payload_pred = predicted(world, classes, args)
            r0 = ranks[0]
            payload = sum(e["payload"] for e in r0["collectives"].values())
            ring = sum(e["ring"] for e in r0["collectives"].values())
            calls = sum(e["calls"] for e in r0["collectives"].values())
            rows.append({
                "classes": classes, "world": world, "N": args.batch, "D": args.dim,
                "chunk_size": args.chunk_size or "", "rows_rank0": r0["num_local"],
                "peak_mb_max_rank": round(max(r["peak_mb"] for r in ranks), 1),
                "peak_mb_min_rank": round(min(r["peak_mb"] for r in ranks), 1),
                "predicted_mb": round(mem_pred, 1),
                "collective_calls": calls, "payload_bytes": payload, "predicted_payload": int(payload_pred),
                "ring_bytes_sent": int(ring),
            })
            print(rows[-1], file=sys.stderr, flush=True)

    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
