"""Head + loss step (forward and backward) beside a naive reference and the GEMM floor, as ratios.

    python benchmarks/bench_head.py                    # default grid, a few minutes on 2 cores
    python benchmarks/bench_head.py --quick            # tiny grid, a smoke test
    python benchmarks/bench_head.py --cases 256x100000 --chunk-size 2048 --rounds 3

Implementations, one world-size-1 step of N samples against C classes of dimension D:

* ``floor``: the three products alone on the same shapes (``x @ W^T``, ``dcos @ W``,
  ``dcos^T @ x``) on inputs allocated beforehand: what any exact head must at least do.
* ``naive``: GB-CosFace written from the formula the way a data-parallel implementation computes
  it (:func:`naive_gbcosface`): full logits, boolean-mask copies of positives and negatives,
  autograd through everything.
* ``ours``: :class:`gbcosface.head.ShardedHead` with GBCosFace, default mode.
* ``chunked``: the same with ``chunk_size`` (memory-bounded mode).

Memory: every (case, implementation) runs ``--mem-rounds`` times, each in a fresh subprocess,
and the table takes the median. Peak memory is the kernel's high-water RSS (``VmHWM``), reset
through ``/proc/self/clear_refs`` after the inputs (weight, embeddings, labels; the floor's
``dcos``) are allocated, minus the RSS at that moment, over two steps (a cold and a warm one):
it sees torch's CPU allocations, which ``tracemalloc`` does not, and unlike ``ru_maxrss`` it is
not polluted by set-up. Two measures keep it to the implementation's own tensors: a tiny step of
the same implementation first (library buffers, lazy imports), and ``MALLOC_MMAP_THRESHOLD_``
fixed at 128 KiB in these processes, so glibc returns every freed tensor to the kernel at once
instead of keeping a heap whose fragmentation moved the peak by 20-90 MB between identical runs
(times are measured with the default allocator). ``extra`` is that peak minus the weight
gradient (C x D fp32, which every implementation must produce): the memory beyond weight and
gradient (and optimizer state, which is not allocated here).

Time: per case, four fresh subprocesses (one per implementation, so none inherits another's
heap or cache state) are started together and each makes a warm-up step; then ``--rounds``
rounds ask each in turn for one timed step. Each ratio is the median over rounds of that round's
ratio, so the implementations are compared under the same load even on a noisy shared machine;
absolute times are medians too and mean little there.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("floor", "naive", "ours", "chunked")
DEFAULT_CASES = ((64, 25_000), (256, 25_000), (256, 100_000), (256, 200_000))
QUICK_CASES = ((32, 2_000), (64, 5_000))


def naive_gbcosface(x, weight, labels, s=32.0, m=0.16, alpha=0.15, boundary=0.6):
    """GB-CosFace over the full ``[N, C]`` logits, every gradient by autograd (the baseline)."""
    import torch
    import torch.nn.functional as F

    cos = F.linear(F.normalize(x), F.normalize(weight)).clamp(-1.0, 1.0)
    is_pos = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
    p_y = cos[is_pos]
    negatives = cos[~is_pos].view(cos.shape[0], cos.shape[1] - 1)
    p_n = torch.logsumexp(s * negatives, dim=1) / s
    p_v = (1.0 - alpha) * ((p_y + p_n) / 2).detach() + alpha * boundary
    pos = F.softplus(2 * s * (p_v - p_y + m))
    neg = F.softplus(2 * s * (p_n - p_v + m))
    return pos.mean() / 2 + neg.mean() / 2


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def build(impl: str, n: int, classes: int, dim: int, chunk: int):
    """Inputs allocated, and a ``step()`` doing forward + backward (or the floor's products)."""
    import torch

    from gbcosface.head import ShardedHead
    from gbcosface.losses import GBCosFace

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    if impl == "floor":
        weight = torch.randn(classes, dim, generator=gen)
        dcos = torch.randn(n, classes, generator=gen)

        def step():
            torch.mm(x, weight.t())
            torch.mm(dcos, weight)
            torch.mm(dcos.t(), x)

        return step
    if impl == "naive":
        weight = torch.nn.Parameter(torch.randn(classes, dim, generator=gen) * 0.01)

        def loss_fn(xi):
            return naive_gbcosface(xi, weight, labels)

    else:
        head = ShardedHead(GBCosFace(), dim, classes, check_inputs=False, chunk_size=chunk if impl == "chunked" else None)
        weight = head.weight

        def loss_fn(xi):
            return head(xi, labels)

    def step():
        weight.grad = None
        loss_fn(x.clone().requires_grad_(True)).backward()

    return step


def memory_worker(impl: str, n: int, classes: int, dim: int, chunk: int) -> dict:
    """Peak RSS over two steps of one implementation, in this fresh process, after a tiny step."""
    build(impl, 8, 256, dim, 64)()
    step = build(impl, n, classes, dim, chunk)
    base_kb = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    step()
    step()
    peak_mb = (_status_kb("VmHWM") - base_kb) / 1024
    return {"peak_mb": peak_mb, "extra_mb": peak_mb - classes * dim * 4 / 2**20}


def time_server(impl: str, n: int, classes: int, dim: int, chunk: int) -> None:
    """Warm up, then time one step per line read from stdin, answering with its seconds."""
    step = build(impl, n, classes, dim, chunk)
    step()
    print("ready", flush=True)
    for _ in sys.stdin:
        t = time.perf_counter()
        step()
        print(time.perf_counter() - t, flush=True)


def _worker_cmd(args, *worker_args) -> tuple[list[str], dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *(str(a) for a in worker_args)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return cmd, env


def run_memory(args, impl: str, n: int, classes: int) -> dict:
    cmd, env = _worker_cmd(args, "memory", impl, n, classes, args.dim, args.chunk_size)
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_times(args, n: int, classes: int) -> dict[str, list[float]]:
    """Interleaved step times of the four implementations, each in its own process."""
    procs = {}
    for impl in IMPLS:
        cmd, env = _worker_cmd(args, "time", impl, n, classes, args.dim, args.chunk_size)
        procs[impl] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        for impl, proc in procs.items():
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"bench_head: the {impl} worker failed to start (exit {proc.wait()})")
        times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        for _ in range(args.rounds):
            for impl, proc in procs.items():
                proc.stdin.write("step\n")
                proc.stdin.flush()
                times[impl].append(float(proc.stdout.readline()))
        return times
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()


def summarise(memory: dict, times: dict, cases, args) -> list[dict]:
    """Medians per (case, impl), and the ratios the issue asks for."""
    rows = []
    for n, c in cases:
        mem = {impl: {k: statistics.median(r[k] for r in memory[(n, c, impl)]) for k in ("peak_mb", "extra_mb")}
               for impl in IMPLS}
        t = times[(n, c)]

        def ratio(impl: str, ref: str) -> float:
            return round(statistics.median(a / b for a, b in zip(t[impl], t[ref])), 3)

        for impl in IMPLS:
            rows.append({
                "N": n, "classes_per_rank": c, "D": args.dim, "impl": impl,
                "chunk_size": args.chunk_size if impl == "chunked" else "",
                "time_s": round(statistics.median(t[impl]), 4),
                "time_vs_floor": ratio(impl, "floor"), "time_vs_naive": ratio(impl, "naive"),
                "time_vs_ours": ratio(impl, "ours"),
                "peak_mb": round(mem[impl]["peak_mb"], 1), "extra_mb": round(mem[impl]["extra_mb"], 1),
                "peak_vs_naive": round(mem[impl]["peak_mb"] / mem["naive"]["peak_mb"], 3),
                "extra_vs_ours": round(mem[impl]["extra_mb"] / mem["ours"]["extra_mb"], 3),
            })
    return rows


def markdown(rows: list[dict], args) -> str:
    import torch

    head = (f"threads={args.threads}, time rounds={args.rounds}, memory rounds={args.mem_rounds}, D={args.dim}, "
            f"chunk_size={args.chunk_size}, torch {torch.__version__}\n\n")
    cols = ["N", "classes_per_rank", "impl", "time_s", "time_vs_floor", "time_vs_naive", "time_vs_ours",
            "peak_mb", "peak_vs_naive", "extra_mb", "extra_vs_ours"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return head + "\n".join(lines) + "\n"


def parse_cases(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",")]


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        kind, impl, *nums = sys.argv[2:]
        if kind == "time":
            time_server(impl, *(int(v) for v in nums))
        else:
            print(json.dumps(memory_worker(impl, *(int(v) for v in nums))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny grid, one round (a smoke test)")
    p.add_argument("--cases", type=parse_cases, help="NxC,NxC,... (global batch x classes per rank)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (one step of each implementation)")
    p.add_argument("--mem-rounds", type=int, default=2, help="fresh processes per implementation for memory")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    p.add_argument("--csv", default="bench_head.csv")
    p.add_argument("--markdown", help="also write the table here")
    args = p.parse_args(argv)
    cases = args.cases or (QUICK_CASES if args.quick else DEFAULT_CASES)
    if args.quick:
        args.rounds, args.mem_rounds, args.chunk_size = 1, 1, min(args.chunk_size, 512)

    memory: dict = {}
    times: dict = {}
    for n, c in cases:
        for r in range(args.mem_rounds):
            for impl in IMPLS:
                res = run_memory(args, impl, n, c)
                memory.setdefault((n, c, impl), []).append(res)
                print(f"N={n} C={c} {impl:8s} memory round {r}: peak {res['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
        times[(n, c)] = run_times(args, n, c)
        print(f"N={n} C={c} times: {times[(n, c)]}", file=sys.stderr, flush=True)
    rows = summarise(memory, times, cases, args)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = markdown(rows, args)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
