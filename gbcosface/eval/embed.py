"""Shared by the evaluators: input normalisation, flip-test embeddings, rank splits."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gbcosface.distributed import DistContext


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` RGB -> float ``(x - 127.5) / 127.5``, the range backbones train on."""
    return (images.float() - 127.5) / 127.5


@torch.no_grad()
def flip_embed(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum of the embeddings of a uint8 batch and of its horizontal mirror (not normalised),
    in float32. The input takes the model's parameter dtype (bf16/fp16 engines).

    Images are kept as uint8 until here and mirrored per batch, so a loaded set costs one byte
    per pixel instead of eight (float original + float flipped copy).
    """
    dtype = next(model.parameters()).dtype
    x = normalise(images.to(device, non_blocking=True)).to(dtype)
    return model(x).float() + model(torch.flip(x, dims=[3])).float()


def rank_indices(n: int, ctx: DistContext) -> np.ndarray:
    """This rank's contiguous share of ``n`` items, padded to ``ceil(n / world)`` by repeating
    the last item, so every rank runs the same number of batches and gathers equal shapes."""
    chunk = math.ceil(n / ctx.world_size)
    idx = np.arange(ctx.rank * chunk, (ctx.rank + 1) * chunk)
    return np.minimum(idx, n - 1)


def gather_rows(local: torch.Tensor, n: int, ctx: DistContext) -> torch.Tensor:
    """All-gather each rank's ``[chunk, D]`` rows (from :func:`rank_indices`) on ``ctx.group``
    and drop the padding: ``[n, D]`` on every rank, in item order."""
    if not ctx.is_distributed:
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local.contiguous(), group=ctx.group)
    return torch.cat(parts)[:n]
