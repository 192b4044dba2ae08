"""One entry point for the training data: ``build_loader(backend="dali" | "torch" | "synthetic")``.

Every backend iterates one epoch per ``for`` loop, yields ``(images float32 [B, 3, H, W],
labels int64 [B])`` with images normalised to ``(x - 127.5) / 127.5``, gives each rank the same
number of batches, and keeps its position in ``state_dict()`` for the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch

BACKENDS = ("dali", "torch", "synthetic")


class SyntheticLoader:
    """Random images with fixed labels, made once on ``device``: measures the model, not the data.

    Labels are ``(rank * batch_size + arange(batch_size)) % num_classes`` so every rank hits
    different classes, as real shards do.
    """

    def __init__(self, batch_size: int, num_classes: int, rank: int = 0, *, image_size: int = 112,
                 batches_per_epoch: int = 100, seed: int = 0, device: torch.device | str = "cpu"):
        if num_classes < 1 or batch_size < 1 or batches_per_epoch < 1:
            raise ValueError("synthetic loader needs num_classes, batch_size and batches_per_epoch >= 1")
        g = torch.Generator().manual_seed(seed * 1009 + rank)
        self.images = (torch.rand(batch_size, 3, image_size, image_size, generator=g) * 2 - 1).to(device)
        self.labels = ((rank * batch_size + torch.arange(batch_size)) % num_classes).to(torch.int64).to(device)
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.batches_consumed = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_consumed = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.batches_consumed < self.batches_per_epoch:
            self.batches_consumed += 1
            yield self.images, self.labels
        self.epoch, self.batches_consumed = self.epoch + 1, 0


def build_loader(backend: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 rec: str | os.PathLike | None = None, idx: str | os.PathLike | None = None,
                 num_classes: int | None = None, image_size: int = 112, num_workers: int = 2, seed: int = 0,
                 skip_corrupt: bool = False, random_flip: bool = True, device: torch.device | str = "cpu",
                 batches_per_epoch: int = 100, **backend_kwargs: Any):
    """Build the loader for this rank; ``rank``/``world_size``/``device`` come from the DistContext.

    Every backend yields tensors on ``device``. ``backend_kwargs`` go to the backend
    (``num_threads``, ``initial_fill``, ``index_dir`` for DALI; ``pin_memory``,
    ``prefetch_factor`` for torch). ``skip_corrupt`` applies to the torch backend; DALI stops
    at an undecodable record (find it with ``python -m gbcosface.data.pack inspect --check``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"data.backend: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "synthetic":
        if not num_classes:
            raise ValueError("data.num_classes must be set for the synthetic backend")
        return SyntheticLoader(batch_size, num_classes, rank, image_size=image_size,
                               batches_per_epoch=batches_per_epoch, seed=seed, device=device)
    if not rec:
        raise ValueError(f"data.rec must name a .rec file for the {backend} backend")
    if not os.path.isfile(rec):
        raise FileNotFoundError(f"data.rec: {rec} not found")
    idx = idx or None
    if backend == "torch":
        from .torch_loader import RecordDataset, TorchLoader

        dataset = RecordDataset(rec, idx, image_size=image_size, num_classes=num_classes or None,
                                skip_corrupt=skip_corrupt)
        return TorchLoader(dataset, batch_size, rank, world_size, seed=seed, num_workers=num_workers,
                           random_flip=random_flip, device=device, **backend_kwargs)
    try:
        from .dali_loader import DaliLoader
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"data.backend = 'dali' needs NVIDIA DALI (pip install gbcosface[dali]): {exc}") from None
    return DaliLoader(rec, idx, batch_size, rank, world_size, device=device, seed=seed,
                      num_classes=num_classes or None, image_size=image_size, random_flip=random_flip,
                      **backend_kwargs)


def build_loader_from_config(data_cfg: Any, ctx: Any, **overrides: Any):
    """``build_loader`` from a ``[data]`` config section and a ``DistContext``."""
    kwargs = dict(batch_size=data_cfg.batch_size, rank=ctx.rank, world_size=ctx.world_size, rec=data_cfg.rec,
                  idx=data_cfg.idx, num_classes=data_cfg.num_classes, image_size=data_cfg.image_size,
                  num_workers=data_cfg.num_workers, seed=data_cfg.seed, skip_corrupt=data_cfg.skip_corrupt,
                  device=ctx.device)
    kwargs.update(overrides)
    return build_loader(data_cfg.backend, **kwargs)
