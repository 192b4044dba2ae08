"""Memory-bounded mode (``chunk_size``) equals the default head, and never holds the block.

The chunked and the default head run the same steps on the same data with the same weights. Both
form identical cosines tile by tile; they differ only in the order of fp32 sums (the online
max/sum-exp merges more tiles, and the embedding gradient adds more partial products), so the
comparison is at rounding level: rtol=1e-4 and atol=1e-6 (fp32) for the loss, both gradients and
the boundary, as for the sharded-versus-reference tests. An ulp of p_n is multiplied by s = 64 in
exp(s cos - s p_n) and by 2s in GB-CosFace's sigmoids, and some gradient entries are small
differences of large ones (the normalisations' backward removes the radial part). bf16 runs
compare two bf16 computations: rtol=1e-2, atol=1e-2.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from gbcosface.head import ShardedHead, class_range
from gbcosface.losses import ArcFace, CosFace, GBCosFace
from tests.dist_utils import run_ranks

TOL = dict(rtol=1e-4, atol=1e-6)
NUM_CLASSES, DIM, LOCAL_BATCH = 29, 16, 5
REPO = Path(__file__).resolve().parents[1]


def make_margin(kind: str):
    if kind == "gbcosface":
        return GBCosFace(s=32.0, m=0.16, alpha=0.15, update_rate=0.3)
    return CosFace(s=64.0, m=0.4) if kind == "cosface" else ArcFace(s=64.0, m=0.5)


def make_head(kind: str, group, chunk_size: int | None, sample_rate: float = 1.0) -> ShardedHead:
    """Same full weight for every world size and mode: rows scaled unevenly so the norms matter."""
    head = ShardedHead(make_margin(kind), DIM, NUM_CLASSES, sample_rate, group, seed=3, chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(NUM_CLASSES, DIM, generator=gen) * torch.rand(NUM_CLASSES, 1, generator=gen).add(0.2)
    with torch.no_grad():
        head.weight.copy_(full[head.class_start : head.class_start + head.num_local])
    return head


def step_data(step: int, world: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of one step's global batch; later steps are near their class rows."""
    gen = torch.Generator().manual_seed(100 + step)
    labels = torch.randint(0, NUM_CLASSES, (LOCAL_BATCH * world,), generator=gen)
    x = torch.randn(LOCAL_BATCH * world, DIM, generator=gen)
    if step >= 2:
        anchors = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(7))
        x = anchors[labels] * 3.0 + 0.3 * x
    sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x[sl], labels[sl]


def run_steps(head: ShardedHead, world: int, rank: int, dtype: torch.dtype = torch.float32, autocast: bool = False):
    """Three steps (boundary initialised, then EMA); returns per-step (loss, dx, dw, boundary)."""
    out = []
    for step in range(3):
        x, labels = step_data(step, world, rank)
        x = x.to(dtype).requires_grad_(True)
        head.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = head(x, labels)
        loss.backward()
        boundary = getattr(head.margin_loss, "boundary", torch.zeros(1)).clone()
        out.append((loss.detach(), x.grad.clone(), head.weight.grad.clone(), boundary))
    return out


def assert_runs_close(chunked, plain, tol) -> None:
    for step, (a, b) in enumerate(zip(chunked, plain)):
        for name, u, v in zip(("loss", "dx", "dw", "boundary"), a, b):
            assert_close(u, v, **tol, equal_nan=True, msg=lambda m: f"step {step} {name}: {m}")


def chunked_equals_plain(ctx, chunk_sizes: tuple[int, ...], sample_rate: float) -> None:
    world, rank = ctx.world_size, ctx.rank
    for kind in ("gbcosface", "cosface", "arcface"):
        plain = run_steps(make_head(kind, ctx.group, None, sample_rate), world, rank)
        for chunk in chunk_sizes:
            chunked = run_steps(make_head(kind, ctx.group, chunk, sample_rate), world, rank)
            assert_runs_close(chunked, plain, TOL)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_chunked_equals_unchunked(world, tmp_path):
    """All three losses; tiles of 1 row, 4 rows (not dividing 29 / W) and more rows than C_local."""
    _, largest = class_range(NUM_CLASSES, world, 0)
    run_ranks(chunked_equals_plain, world, tmp_path, (1, 4, largest + 5), 1.0)


@pytest.mark.parametrize("world", [1, 2])
def test_chunked_with_partial_fc(world, tmp_path):
    """Tiles walk the sampled rows; the same seed draws the same sample in both modes."""
    run_ranks(chunked_equals_plain, world, tmp_path, (3, 100), 0.5)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-embeddings", "autocast"])
def test_chunked_bf16(autocast):
    """bf16 cosines, fp32 statistics, and gradients in the embeddings' dtype, as in the default mode."""
    dtype = torch.float32 if autocast else torch.bfloat16
    for kind in ("gbcosface", "cosface", "arcface"):
        plain = run_steps(make_head(kind, None, None), 1, 0, dtype, autocast)
        chunked = run_steps(make_head(kind, None, 4), 1, 0, dtype, autocast)
        loss, dx, dw, _ = chunked[0]
        assert loss.dtype == torch.float32 and dx.dtype == dtype and dw.dtype == torch.float32
        assert_runs_close(chunked, plain, dict(rtol=1e-2, atol=1e-2))


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _lse_node(loss: torch.Tensor):
    """The head's backward node, found by walking the autograd graph from the loss."""
    todo, seen = [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_PositiveAndNegativeLSEBackward":
            return node
        todo.extend(fn for fn, _ in node.next_functions)
    raise AssertionError("the head's autograd node is not in the graph")


def test_chunked_never_holds_the_block():
    """No op creates a tensor with more than chunk_size columns per sample, and the graph keeps
    only O(N D + C) for backward; the default mode keeps the [N, C] block, until backward."""
    n, classes, dim, chunk = 8, 300, 16, 32
    x, labels = torch.randn(n, dim, requires_grad=True), torch.randint(0, classes, (n,))
    for chunk_size in (chunk, None):
        head = ShardedHead(GBCosFace(), dim, classes, chunk_size=chunk_size)
        with _Shapes() as seen:
            loss = head(x, labels)
            saved = [t for t in _lse_node(loss).saved_tensors if t is not None]
            loss.backward()
        with pytest.raises(RuntimeError, match="freed"):  # released after backward, loss still alive
            _lse_node(loss).saved_tensors
        # x_hat [N, D], col and p_n [N], the row norms [C], and in the default mode the block;
        # the weight is saved as itself, not a copy.
        assert any(t.data_ptr() == head.weight.data_ptr() for t in saved)
        block = n * classes if chunk_size is None else 0
        assert sum(t.numel() for t in saved if t.data_ptr() != head.weight.data_ptr()) == n * dim + 2 * n + classes + block
        if chunk_size is not None:
            wide = [s for s in seen.shapes if len(s) == 2 and s[0] == n and s[1] > chunk and s[1] != dim]
            assert not wide, f"[N, >chunk] tensors created: {wide}"


def test_chunk_size_validation_and_repr():
    with pytest.raises(ValueError, match="chunk_size must be None or >= 1"):
        ShardedHead(CosFace(), 4, 10, chunk_size=0)
    assert "chunk_size=64" in repr(ShardedHead(CosFace(), 4, 10, chunk_size=64))


@pytest.mark.slow
def test_bench_head_quick_writes_csv(tmp_path):
    csv = tmp_path / "head.csv"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_head.py"), "--quick", "--csv", str(csv),
           "--markdown", str(tmp_path / "head.md")]
    subprocess.run(cmd, check=True, cwd=REPO, timeout=300)
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("N,classes_per_rank") and len(lines) >= 2
