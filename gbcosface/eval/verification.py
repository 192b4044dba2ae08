"""Pair verification on InsightFace ``.bin`` sets (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` file is a pickle of ``(bins, issame)``: ``2P`` encoded images (JPEG/PNG bytes; pair
``i`` is images ``2i`` and ``2i+1``) and ``P`` booleans. Files made with Python 2 hold the
images as ``str``; they are read with ``encoding="bytes"``, falling back to ``"latin1"`` (which
numpy arrays pickled by Python 2 need) and re-encoding text entries to bytes.

Protocol (as InsightFace's): embeddings are the sum of an image's and its mirror's, L2
normalised; the pairs are cut into 10 contiguous folds; for each fold the squared-distance
threshold with the best accuracy on the other nine folds (grid 0, 0.01, ..., 3.99; first best)
is applied to the held-out fold; the mean and std of the ten accuracies are reported. TAR@FAR
uses the cosine scores of all pairs (see :mod:`gbcosface.eval.roc`).

Inside training, every rank calls :func:`verify` with its :class:`DistContext`; each embeds a
share of the images and the embeddings are all-gathered, so all ranks return the same result.
"""

from __future__ import annotations

import argparse
import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from gbcosface.backbones import unwrap
from gbcosface.distributed import DistContext, exit_process, init_distributed, teardown
from gbcosface.eval.embed import flip_embed, gather_rows, rank_indices
from gbcosface.progress import Progress
from gbcosface.eval.roc import DEFAULT_FARS, format_far, format_table, min_resolvable_far, tar_at_far
from gbcosface.eval.cli import run

THRESHOLDS = np.arange(0.0, 4.0, 0.01)

# What a .bin pickle may reference: numpy arrays/scalars (some writers store images as uint8
# arrays) and the helpers Python 3 uses to pickle bytes at protocols < 3. Nothing executable.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"), ("builtins", "bytearray"), ("__builtin__", "bytearray"),
    ("builtins", "bytes"),
}


class _BinUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


@dataclass
class VerificationSet:
    """``images``: uint8 ``[2P, 3, H, W]`` RGB; ``issame``: bool ``[P]``."""

    name: str
    images: torch.Tensor
    issame: np.ndarray

    def __len__(self) -> int:
        return len(self.issame)


@dataclass
class VerificationResult:
    name: str
    accuracy: float
    accuracy_std: float
    threshold: float
    tar_at_far: dict[float, float]
    min_far: float
    scores: np.ndarray
    labels: np.ndarray

    def summary(self) -> str:
        tars = "  ".join(f"{format_far(f)}:{100 * t:.2f}{'*' if f < self.min_far else ''}"
                         for f, t in self.tar_at_far.items())
        return (f"{self.name}: accuracy {100 * self.accuracy:.2f}% +- {100 * self.accuracy_std:.2f} "
                f"(threshold {self.threshold:.3f})  TAR@FAR {tars}")

    def save(self, out_dir: str | Path) -> None:
        """``scores.npy`` (cosine per pair) and ``labels.npy`` (bool): what ``eval.compare`` reads."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "scores.npy", self.scores)
        np.save(out / "labels.npy", self.labels)


def _read_pickle(path: Path) -> tuple:
    raw = path.read_bytes()
    errors = []
    for encoding in ("bytes", "latin1"):
        try:
            return _BinUnpickler(io.BytesIO(raw), encoding=encoding).load()
        except Exception as exc:  # any failure means: try the next encoding, then report both
            errors.append(f"encoding={encoding!r}: {exc}")
    raise ValueError(f"{path}: not a readable .bin pickle ({'; '.join(errors)})")


def _entry_bytes(entry: object, path: Path, i: int) -> bytes:
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return bytes(entry)
    if isinstance(entry, str):
        return entry.encode("latin1")
    if isinstance(entry, np.ndarray):
        return entry.tobytes()
    raise ValueError(f"{path}: image {i} is a {type(entry).__name__}, expected encoded image bytes")


def decode_image(data: bytes, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """Encoded image -> uint8 ``[3, H, W]`` RGB, resized (bilinear) when not ``size`` (W, H)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    return np.asarray(img).transpose(2, 0, 1)


def load_bin(path: str | Path, image_size: tuple[int, int] = (112, 112)) -> VerificationSet:
    """Load an InsightFace ``.bin`` pair set (Python 2 or 3 pickle) and decode its images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set not found: {path}")
    obj = _read_pickle(path)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    issame = np.asarray([bool(v) for v in issame], dtype=bool)
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (need 2 per pair)")
    images = np.empty((len(bins), 3, image_size[1], image_size[0]), dtype=np.uint8)
    for i, entry in enumerate(bins):
        try:
            images[i] = decode_image(_entry_bytes(entry, path, i), image_size)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: image {i} cannot be decoded: {exc}") from None
    return VerificationSet(path.stem, torch.from_numpy(images), issame)


def kfold_accuracy(dist: np.ndarray, issame: np.ndarray, n_folds: int = 10,
                   thresholds: np.ndarray = THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold accuracy and threshold: ``dist < t`` predicts "same", ``t`` chosen on the
    other folds. Folds are contiguous, the first ``P % n_folds`` one pair larger."""
    issame = np.asarray(issame, dtype=bool)
    if len(issame) < n_folds:
        raise ValueError(f"{len(issame)} pairs cannot make {n_folds} folds")
    correct = (dist[None, :] < thresholds[:, None]) == issame[None, :]  # [T, P]
    accs, best = [], []
    for test in np.array_split(np.arange(len(issame)), n_folds):
        train = np.ones(len(issame), dtype=bool)
        train[test] = False
        t = int(np.argmax(correct[:, train].mean(axis=1)))
        best.append(thresholds[t])
        accs.append(correct[t, test].mean())
    return np.asarray(accs), np.asarray(best)


def evaluate(embeddings: np.ndarray, issame: np.ndarray, name: str = "pairs", n_folds: int = 10,
             fars: Sequence[float] = DEFAULT_FARS) -> VerificationResult:
    """Metrics from ``[2P, D]`` embeddings (normalised here) and ``P`` labels."""
    emb = np.asarray(embeddings, dtype=np.float64)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    e1, e2 = emb[0::2], emb[1::2]
    dist = np.sum((e1 - e2) ** 2, axis=1)
    accs, thr = kfold_accuracy(dist, issame, n_folds)
    scores = np.sum(e1 * e2, axis=1)
    labels = np.asarray(issame, dtype=bool)
    return VerificationResult(name, float(accs.mean()), float(accs.std()), float(thr.mean()),
                              tar_at_far(scores, labels, fars), min_resolvable_far(labels), scores, labels)


def embed_images(model: nn.Module, images: torch.Tensor, ctx: DistContext, batch_size: int = 128,
                 progress: bool = True, label: str = "embed") -> torch.Tensor:
    """Flip-test embeddings ``[N, D]`` (not normalised) of uint8 images, split across ranks
    and all-gathered: every rank must call this. The backbone (unwrapped from DDP/DeepSpeed)
    runs in eval mode and is put back in its previous mode."""
    n = len(images)
    idx = torch.from_numpy(rank_indices(n, ctx))
    desc = f"{label} (rank 0 of {ctx.world_size})" if ctx.world_size > 1 else label
    bar = Progress(len(idx), desc=desc, unit="img", every_s=1.0,
                   enabled=progress and ctx.is_main)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        out = [flip_embed(model, images[b], ctx.device) for b in bar.wrap(idx.split(batch_size))]
    finally:
        model.train(was_training)
    return gather_rows(torch.cat(out), n, ctx).cpu()


def verify(model: nn.Module, vset: VerificationSet, ctx: DistContext, batch_size: int = 128,
           fars: Sequence[float] = DEFAULT_FARS, progress: bool = False) -> VerificationResult:
    """Evaluate ``model`` on one pair set; call on every rank (collective), same result on all."""
    emb = embed_images(model, vset.images, ctx, batch_size, progress, label=vset.name)
    return evaluate(emb.numpy(), vset.issame, vset.name, fars=fars)


def main(argv: Sequence[str] | None = None) -> int:
    from gbcosface.export import load_backbone

    p = argparse.ArgumentParser(prog="python -m gbcosface.eval.verification", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="backbone export (model.pt from gbcosface.export)")
    p.add_argument("--backbone", help="backbone name, only for a plain state-dict checkpoint")
    p.add_argument("--bin", nargs="+", required=True, help=".bin pair sets (lfw.bin cfp_fp.bin ...)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--output", help="directory for <set>/scores.npy + labels.npy (for eval.compare)")
    args = p.parse_args(argv)
    ctx = init_distributed(device=args.device)
    try:
        model = load_backbone(args.checkpoint, name=args.backbone).to(ctx.device)
        rows = {}
        for path in args.bin:
            vset = load_bin(path)
            res = verify(model, vset, ctx, args.batch_size, progress=True)
            rows[res.name] = (res.tar_at_far, res.min_far)
            if ctx.is_main:
                print(res.summary(), flush=True)
                if args.output:
                    res.save(Path(args.output) / res.name)
        if ctx.is_main:
            print(format_table(rows))
    finally:
        teardown(ctx)
    return 0


if __name__ == "__main__":
    exit_process(run(main))
