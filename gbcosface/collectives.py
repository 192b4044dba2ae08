"""Collectives the sharded head needs, each taking its process group explicitly.

Gradient-scale contract (read this before wiring a data-parallel backbone):

* The head returns the SAME scalar loss ``L`` on every rank: the mean over the global batch
  ``N = sum of B_r``.
* :func:`all_gather_with_grad` gathers the local embeddings ``[B, D]`` into ``[N, D]``. Each rank
  then differentiates ``L`` only through its own class block, so rank r holds a *partial*
  ``dL/dx_global``; the backward reduce-scatters (sums) these partials, so each rank receives the
  exact ``dL/dx_local`` of its own samples, times ``grad_scale``.
* With ``grad_scale = 1`` the backbone on rank r therefore gets the gradient of ``L`` through its
  local samples only. The true gradient of ``L`` w.r.t. the (replicated) backbone is the SUM of
  these over ranks. DDP and DeepSpeed AVERAGE gradients over the W data-parallel ranks, so a
  trainer that wants the exact single-process gradient passes ``grad_scale = W``; that is what
  :class:`gbcosface.head.ShardedHead` does with ``embedding_grad_scale``, and the trainer sets it
  to the world size when the backbone is wrapped in DDP or DeepSpeed.
* The head's weight shard is owned by one rank, receives the exact ``dL/dw_local`` and must never
  be averaged by a data-parallel wrapper.

With ``group=None`` (a single process) every function here is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else group.size()


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else group.rank()


class _AllGatherWithGrad(torch.autograd.Function):
    """forward: all-gather along dim 0; backward: reduce-scatter (sum), times grad_scale.

    Shapes: ``x_local [B, ...]`` (B equal on every rank) -> ``x_global [W * B, ...]``, rank r's
    rows at ``[r * B, (r + 1) * B)``.
    """

    @staticmethod
    def forward(ctx, x_local: torch.Tensor, group: ProcessGroup, grad_scale: float) -> torch.Tensor:
        ctx.group, ctx.grad_scale = group, grad_scale
        world = group.size()
        x_local = x_local.contiguous()
        parts = [torch.empty_like(x_local) for _ in range(world)]
        dist.all_gather(parts, x_local, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_global: torch.Tensor):
        world = ctx.group.size()
        parts = [p.contiguous() for p in grad_global.chunk(world, dim=0)]
        grad_local = torch.empty_like(parts[0])
        dist.reduce_scatter(grad_local, parts, op=ReduceOp.SUM, group=ctx.group)
        if ctx.grad_scale != 1.0:
            grad_local.mul_(ctx.grad_scale)
        return grad_local, None, None


class _ScaleGrad(torch.autograd.Function):
    """forward: identity; backward: gradient times ``scale`` (the one-rank all-gather)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def all_gather_with_grad(
    x_local: torch.Tensor, group: ProcessGroup | None, grad_scale: float = 1.0
) -> torch.Tensor:
    """All-gather ``x_local [B, ...] -> x_global [W*B, ...]`` with autograd.

    forward: all-gather; backward: reduce-scatter (sum) of ``dL/dx_global`` back to the owning
    rank, multiplied by ``grad_scale`` (see the module docstring for when it is the world size).
    Every rank must pass the same B.
    """
    if group is None or group.size() == 1:
        return x_local if grad_scale == 1.0 else _ScaleGrad.apply(x_local, float(grad_scale))
    return _AllGatherWithGrad.apply(x_local, group, float(grad_scale))


def all_gather_nograd(x_local: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """All-gather along dim 0 without autograd (labels, per-rank statistics)."""
    if group is None or group.size() == 1:
        return x_local
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in range(group.size())]
    dist.all_gather(parts, x_local, group=group)
    return torch.cat(parts, dim=0)


def all_reduce_(x: torch.Tensor, group: ProcessGroup | None, op: ReduceOp = ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce (no autograd); the identity without a group."""
    if group is not None and group.size() > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def all_reduce_mean_(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """In-place mean over ranks (no autograd)."""
    if group is not None and group.size() > 1:
        dist.all_reduce(x, op=ReduceOp.SUM, group=group)
        x.div_(group.size())
    return x
