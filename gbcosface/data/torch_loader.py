"""CPU data path: a Dataset over the RecordIO reader, a sharded batch sampler, a resumable loader.

The sampler decides everything random (the epoch's permutation and each sample's flip) from
``(seed, epoch)``, so a run that resumes mid-epoch sees exactly the batches, and the flips, it
would have seen without the interruption, whatever the number of workers.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .images import decode_image
from .recordio import CorruptRecordError, RecordReader, detect_layout, first_label

log = logging.getLogger(__name__)

Item = tuple[int, bool]  # (dataset index, horizontal flip)


class RecordDataset(Dataset):
    """Image records of a .rec file (InsightFace or plain im2rec layout) as normalised tensors.

    ``dataset[i]`` or ``dataset[(i, flip)]`` -> ``(float32 [3, H, W] in [-1, 1], int label)``.
    A label outside ``[0, num_classes)``, a non-integer label, an image of the wrong size or an
    undecodable payload raises :class:`CorruptRecordError` naming file, key and byte offset; with
    ``skip_corrupt=True`` the record is logged, counted in ``skipped`` (per process) and replaced
    by the next readable record, so batches keep their size and no label is ever invented.
    """

    def __init__(self, path_rec: str | os.PathLike, path_idx: str | os.PathLike | None = None, *,
                 image_size: int = 112, num_classes: int | None = None, skip_corrupt: bool = False,
                 decoder: str | None = None):
        self.reader = RecordReader(path_rec, path_idx)
        self.layout = detect_layout(self.reader)
        self.keys = self.layout.image_keys
        if len(self.keys) == 0:
            raise ValueError(f"{self.reader.path_rec}: no image records")
        self.image_size = image_size
        self.num_classes = num_classes
        self.skip_corrupt = skip_corrupt
        self.decoder = decoder
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """Decoded RGB uint8 ``[H, W, 3]`` and the integer label of image ``index``."""
        key = int(self.keys[index])
        header, payload = self.reader[key]

        def bad(reason: str) -> CorruptRecordError:
            return CorruptRecordError(self.reader.path_rec, key, self.reader.offset(key), reason)

        value = first_label(header)
        if not math.isfinite(value) or value != int(value):
            raise bad(f"label {value} is not an integer")
        label = int(value)
        if label < 0 or self.num_classes is not None and label >= self.num_classes:
            raise bad(f"label {label} is outside the configured classes [0, {self.num_classes})")
        try:
            img = decode_image(payload, self.decoder)
        except ValueError as exc:
            raise bad(str(exc)) from None
        if img.shape != (self.image_size, self.image_size, 3):
            raise bad(f"image is {img.shape[1]}x{img.shape[0]}, expected {self.image_size}x{self.image_size} "
                      "(aligned face crops; resize when packing)")
        return img, label

    def get_uint8(self, item: int | Item) -> tuple[torch.Tensor, int]:
        """``(uint8 [3, H, W], label)``, flipped when asked; corrupt records skipped if allowed."""
        index, flip = (item, False) if isinstance(item, (int, np.integer)) else item
        index = int(index)
        for attempt in range(len(self.keys)):
            try:
                img, label = self.load((index + attempt) % len(self.keys))
                break
            except CorruptRecordError as exc:
                if not self.skip_corrupt:
                    raise
                self.skipped += 1
                log.warning("skipping corrupt record (%d skipped in this process): %s", self.skipped, exc)
        else:
            raise RuntimeError(f"{self.reader.path_rec}: no readable image record left")
        if flip:
            img = img[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), label

    def __getitem__(self, item: int | Item) -> tuple[torch.Tensor, int]:
        x, label = self.get_uint8(item)
        return normalize(x), label


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 ``(x - 127.5) / 127.5``, the range InsightFace models are trained on."""
    return images_uint8.to(torch.float32).sub_(127.5).div_(127.5)


class _Uint8View(Dataset):
    """Workers send uint8 images (4x less to copy between processes); the batch is normalised once."""

    def __init__(self, dataset: RecordDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, int]:
        return self.dataset.get_uint8(item)


class ShardedBatchSampler:
    """Per-rank batches of one epoch: a global permutation from ``(seed, epoch)``, then drop_last.

    Each global step takes the next ``batch_size * world_size`` samples of the permutation and
    gives rank ``r`` the ``r``-th slice, so ranks are disjoint, together cover every used sample
    once, and all have the same number of batches of the same size.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, *, seed: int = 0,
                 shuffle: bool = True, random_flip: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < batch_size * world_size:
            raise ValueError(f"{num_samples} samples cannot fill one batch of {batch_size} on each of "
                             f"{world_size} ranks")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.random_flip = seed, shuffle, random_flip

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def epoch_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's ``(indices, flips)``, both ``[batches, batch_size]``, for ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        flips = rng.random(self.num_samples) < 0.5 if self.random_flip else np.zeros(self.num_samples, bool)
        used = len(self) * self.batch_size * self.world_size
        shape = (len(self), self.world_size, self.batch_size)
        return order[:used].reshape(shape)[:, self.rank], flips[:used].reshape(shape)[:, self.rank]

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[Item]]:
        indices, flips = self.epoch_batches(epoch)
        for b in range(start_batch, len(self)):
            yield list(zip(indices[b].tolist(), flips[b].tolist()))


def _sigterm_from_parent_only(worker_id: int) -> None:
    """Loader workers obey SIGTERM from their rank only.

    A scheduler (SLURM preemption) signals every process of the job; a worker that died of it
    would take its rank down before the rank could checkpoint, so a SIGTERM from anyone else is
    ignored: the rank saves and exits, and its workers follow (they watch their parent). The
    parent's own SIGTERM (multiprocessing's shutdown of daemonic children at exit, DataLoader's
    terminate after a join timeout) still ends the worker, so nothing waits on it forever.
    SIGTERM is blocked in every thread and taken by one thread that sees the sender's pid.
    """
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


class _Batches:
    """A re-iterable list of batches for ``DataLoader(batch_sampler=...)``."""

    def __init__(self, batches: Sequence[list[Item]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchLoader:
    """Iterate one epoch per ``for`` loop; yields ``(images float [B,3,H,W], labels int64 [B])`` on ``device``.

    Workers decode to uint8; the batch is moved to ``device`` as uint8 (pinned when on CUDA) and
    normalised there, so the host copies and transfers a quarter of the float bytes.

    The position counts batches handed to the caller (not batches prefetched by workers), so
    ``state_dict()`` taken after step ``k`` resumes at batch ``k`` of the same epoch.
    """

    def __init__(self, dataset: RecordDataset, batch_size: int, rank: int, world_size: int, *, seed: int = 0,
                 num_workers: int = 2, shuffle: bool = True, random_flip: bool = True,
                 device: torch.device | str = "cpu", pin_memory: bool | None = None,
                 prefetch_factor: int | None = None):
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = ShardedBatchSampler(len(dataset), batch_size, rank, world_size, seed=seed,
                                           shuffle=shuffle, random_flip=random_flip)
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.epoch = 0
        self.batches_consumed = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_consumed = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": self.sampler.seed,
                "world_size": self.sampler.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume; a different world size or batch size cannot keep the position, so it restarts the epoch."""
        self.epoch = int(state["epoch"])
        same = (state.get("world_size", self.sampler.world_size) == self.sampler.world_size
                and state.get("batch_size", self.batch_size) == self.batch_size)
        self.batches_consumed = int(state["batches_consumed"]) if same else 0
        if not same:
            log.warning("data position from a run with world_size=%s batch_size=%s: restarting epoch %d",
                        state.get("world_size"), state.get("batch_size"), self.epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.batches_consumed
        batches = list(self.sampler.iter_epoch(epoch, start))
        kwargs = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        if self.num_workers > 0:
            kwargs["worker_init_fn"] = _sigterm_from_parent_only
        loader = DataLoader(_Uint8View(self.dataset), batch_sampler=_Batches(batches), num_workers=self.num_workers,
                            pin_memory=self.pin_memory, **kwargs)
        for images, labels in loader:
            self.batches_consumed += 1
            images = images.to(self.device, non_blocking=True)
            yield normalize(images), labels.to(self.device, torch.int64, non_blocking=True)
        if self.epoch == epoch and self.batches_consumed >= len(self):
            self.epoch, self.batches_consumed = epoch + 1, 0
