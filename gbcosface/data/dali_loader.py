"""GPU data path: NVIDIA DALI reads the .rec, decodes (``mixed`` on GPU, ``cpu`` without one),
mirrors at random and normalises to ``(x - 127.5) / 127.5``.

DALI reads every record listed in the index it is given, and an InsightFace file's header and
identity records are not images, so this loader writes its own index that lists image records
only (DALI sizes each record from the next listed offset, and its parser stops after the first
record, so the unlisted records in between are simply never read). The list is trimmed to a
multiple of the world size, the trimmed records drawn by the seed, so every shard is the same
size and every rank gets the same number of full batches.

DALI shuffles within a buffer of ``initial_fill`` samples only; InsightFace files are sorted by
identity, so for real training run ``python -m gbcosface.data.pack shuffle`` once first.
``nvidia.dali`` is imported only when this loader is built.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .recordio import RecordReader, detect_layout, write_index

log = logging.getLogger(__name__)


def write_image_index(path_rec: str | os.PathLike, path_idx: str | os.PathLike | None, out_idx: str | os.PathLike,
                      world_size: int = 1, seed: int = 0) -> int:
    """Write an index of the image records only (trimmed to a multiple of ``world_size``); returns the count."""
    reader = RecordReader(path_rec, path_idx)
    layout = detect_layout(reader)
    keys = layout.image_keys
    drop = len(keys) % world_size
    if drop:
        keep = np.ones(len(keys), dtype=bool)
        keep[np.random.default_rng([seed, 0xD1]).choice(len(keys), drop, replace=False)] = False
        keys = keys[keep]
    write_index(out_idx, keys.tolist(), reader.offsets_for(keys).tolist())
    return len(keys)


class DaliLoader:
    """Iterate one epoch per ``for`` loop; yields ``(images float [B,3,H,W], labels int64 [B])``.

    Images are on the GPU given by ``device`` (``mixed`` decode) or on the CPU when ``device`` is
    CPU (DALI runs with ``device_id=None``). Labels are checked against ``num_classes`` on the
    host before they leave it, so a bad label stops the run instead of training on it.

    The position (epoch, batches consumed) is kept like the torch loader's; DALI cannot seek, so a
    resume mid-epoch skips the consumed number of batches of a fresh epoch: the step count is
    exact, the sample order is not reproduced.
    """

    def __init__(self, path_rec: str | os.PathLike, path_idx: str | os.PathLike | None, batch_size: int,
                 rank: int, world_size: int, *, device: torch.device | str = "cpu", seed: int = 0,
                 num_classes: int | None = None, image_size: int = 112, random_flip: bool = True,
                 num_threads: int = 2, initial_fill: int = 4096, index_dir: str | os.PathLike | None = None):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.path_rec = str(path_rec)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.num_classes = num_classes
        index_dir = Path(index_dir) if index_dir else Path(tempfile.mkdtemp(prefix="gbcosface-dali-"))
        index_dir.mkdir(parents=True, exist_ok=True)
        self.index_path = str(index_dir / f"{Path(path_rec).stem}.images.rank{rank}.idx")
        total = write_image_index(path_rec, path_idx, self.index_path, world_size, seed)
        self.shard_size = total // world_size
        if self.shard_size < batch_size:
            raise ValueError(f"{path_rec}: {total} images cannot fill one batch of {batch_size} on each of "
                             f"{world_size} ranks")
        if detect_layout(RecordReader(path_rec, path_idx)).kind == "insightface" and initial_fill < total:
            log.warning("%s is sorted by identity and DALI shuffles within %d samples only; run "
                        "`python -m gbcosface.data.pack shuffle` for a global shuffle", path_rec, initial_fill)
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                      seed=seed * 1009 + rank, prefetch_queue_depth=2)
        def pipe():
            jpegs, labels = fn.readers.mxnet(path=[self.path_rec], index_path=[self.index_path], shard_id=rank,
                                             num_shards=world_size, random_shuffle=True, initial_fill=initial_fill,
                                             name="Reader")
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
            mirror = fn.random.coin_flip(probability=0.5) if random_flip else 0
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              crop=(image_size, image_size), mean=[127.5] * 3, std=[127.5] * 3,
                                              mirror=mirror)
            return images, labels

        self._pipe = pipe()
        self._pipe.build()
        self._iter = DALIGenericIterator([self._pipe], ["images", "labels"], reader_name="Reader",
                                         last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
        self.epoch = 0
        self.batches_consumed = 0
        self._skip = 0

    def __len__(self) -> int:
        return self.shard_size // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_consumed = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batches_consumed = self._skip = int(state["batches_consumed"])

    def _labels(self, raw: torch.Tensor) -> torch.Tensor:
        labels = raw.reshape(raw.shape[0], -1)[:, 0]
        as_int = labels.to(torch.int64)
        if not torch.equal(as_int.to(labels.dtype), labels):
            raise ValueError(f"{self.path_rec}: non-integer label in a batch: {labels[as_int != labels][:3].tolist()}")
        hi = self.num_classes
        if (as_int < 0).any() or hi is not None and (as_int >= hi).any():
            bad = as_int[(as_int < 0) | (as_int >= (hi if hi is not None else 2 ** 62))][:3].tolist()
            raise ValueError(f"{self.path_rec}: label(s) {bad} outside the configured classes [0, {hi}); "
                             "find the records with `python -m gbcosface.data.pack inspect`")
        return as_int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        for i, out in enumerate(self._iter):
            if i < self._skip:
                continue
            images, labels = out[0]["images"], self._labels(out[0]["labels"].cpu())
            self.batches_consumed += 1
            yield images, labels.to(images.device, non_blocking=True)
        self._skip = 0
        if self.epoch == epoch:
            self.epoch, self.batches_consumed = epoch + 1, 0
