"""Shared by the evaluators: input normalisation, flip-test embeddings, rank splits, progress."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

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


class Progress:
    """One self-overwriting line: done/total, rate and ETA, at most once per ``every_s``."""

    def __init__(self, total: int, label: str, enabled: bool = True, unit: str = "img",
                 stream: TextIO | None = None, every_s: float = 1.0) -> None:
        self.total, self.label, self.enabled, self.unit = total, label, enabled, unit
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.done = self.width = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            text = (f"{self.label}: {self.done}/{self.total} {self.unit} {rate:.1f} {self.unit}/s "
                    f"ETA {int(eta) // 60:d}:{int(eta) % 60:02d}")
            self.width = max(self.width, len(text))
            end = "\n" if self.done >= self.total else ""
            self.stream.write(f"\r{text:<{self.width}}{end}")
            self.stream.flush()

    def wrap(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for b in batches:
            yield b
            self.update(len(b))
