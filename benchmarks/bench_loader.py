"""Images per second per worker: torch loader and DALI CPU loader beside a bare decode, as ratios.

    python benchmarks/bench_loader.py                      # synthetic data in a temp folder
    python benchmarks/bench_loader.py --rec data/train.rec --workers 2 --batches 50

The bare decode (the same JPEGs, one process, no loader) is measured in the same run, so the
ratios say what the loader machinery costs on this machine, independent of its speed. "Per
worker" divides by the torch loader's worker processes or DALI's threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gbcosface.data.images import decode_image, has_simplejpeg  # noqa: E402
from gbcosface.data.recordio import RecordReader, detect_layout  # noqa: E402


def bare_decode(rec: str, limit: int, backend: str) -> float:
    reader = RecordReader(rec)
    keys = detect_layout(reader).image_keys[:limit].tolist()
    payloads = [reader[k][1] for k in keys]
    t = time.perf_counter()
    for p in payloads:
        decode_image(p, backend)
    return len(payloads) / (time.perf_counter() - t)


def worker_side(rec: str, batches: int, batch_size: int) -> float:
    """One worker's share of the torch loader, in this process: read, decode, flip, collate.

    What the loader adds on top (moving batches between processes and normalising them to
    floats in the main process) is the difference between this rate and ``torch_loader``'s.
    """
    from torch.utils.data import default_collate

    from gbcosface.data.torch_loader import RecordDataset

    dataset = RecordDataset(rec)
    n = min(len(dataset), batches * batch_size)
    t = time.perf_counter()
    for start in range(0, n - batch_size + 1, batch_size):
        default_collate([dataset.get_uint8((i, i % 2 == 0)) for i in range(start, start + batch_size)])
    return (n - n % batch_size) / (time.perf_counter() - t)


def loader_rate(loader, batches: int, batch_size: int) -> float:
    it = iter(loader)
    next(it)  # start-up (workers, pipeline build) is not throughput
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
        n += batch_size
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rec", help="a .rec file (default: generate synthetic identities)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--workers", type=int, default=2, help="torch workers and DALI threads")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rec = args.rec
    if rec is None:
        from gbcosface.data.synthetic import generate

        out = tempfile.mkdtemp(prefix="bench-loader-")
        rec = generate(out, identities=100, images_per_identity=20, val_pairs=0, workers=args.workers,
                       verbose=False)["rec"]
    images = (args.batches + 1) * args.batch_size
    results = {"bare_pillow": bare_decode(rec, images, "pillow")}
    if has_simplejpeg():
        results["bare_simplejpeg"] = bare_decode(rec, images, "simplejpeg")
    bare = results.get("bare_simplejpeg", results["bare_pillow"])
    from gbcosface.data import build_loader

    results["torch_worker_side"] = worker_side(rec, args.batches, args.batch_size)
    loader = build_loader("torch", batch_size=args.batch_size, rec=rec, num_workers=args.workers)
    results["torch_loader"] = loader_rate(loader, args.batches, args.batch_size)
    try:
        dali = build_loader("dali", batch_size=args.batch_size, rec=rec, num_threads=args.workers,
                            index_dir=tempfile.mkdtemp(prefix="bench-dali-"))
        results["dali_cpu"] = loader_rate(dali, args.batches, args.batch_size)
    except ImportError as exc:
        print(f"DALI skipped: {exc}", file=sys.stderr)
    per = {"torch_loader": args.workers, "dali_cpu": args.workers}
    print(f"{'path':<18}{'img/s':>10}{'img/s/worker':>14}{'vs bare decode/core':>22}")
    for name, rate in results.items():
        w = per.get(name, 1)
        print(f"{name:<18}{rate:>10.0f}{rate / w:>14.0f}{rate / w / bare:>22.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workers": args.workers, "batch_size": args.batch_size, "images_per_s": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
