"""IJB-B / IJB-C 1:1 template verification, following InsightFace's IJB protocol.

Layout under ``--root`` (``p`` = ``ijbc`` or ``ijbb`` from ``--target``)::

    loose_crop/<img>                          face images
    meta/<p>_name_5pts_score.txt              "<img> x1 y1 ... x5 y5 <detector score>"
    meta/<p>_face_tid_mid.txt                 "<img> <template id> <media id>"
    meta/<p>_template_pair_label.txt          "<template 1> <template 2> <label 0|1>"

Per image: align the five landmarks to the 112x112 template, embed it and its mirror and sum
(flip-test), scale by the detector score. Images are not L2-normalised first (InsightFace's
default; their norm acts as a quality weight) unless ``normalise_images``. Per template:
average the images of each media (video or photo), sum the media means, L2-normalise. A pair's
score is the cosine of its two template features.

Outputs (``--output``): ``image_features.npy`` (raw flip-sum per row of the 5pts file),
``template_ids.npy`` + ``template_features.npy``, ``scores.npy`` + ``labels.npy`` (per pair, for
``eval.compare``), ``tar_at_far.json``, ``roc.png``. Under torchrun each rank embeds a share of
the images; rank 0 aggregates and writes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gbcosface.backbones import unwrap
from gbcosface.distributed import DistContext, exit_process, init_distributed, teardown
from gbcosface.eval.align import align_face
from gbcosface.eval.embed import flip_embed, gather_rows, rank_indices
from gbcosface.progress import Progress
from gbcosface.eval.plot import plot_roc
from gbcosface.eval.roc import DEFAULT_FARS, format_table, min_resolvable_far, roc_curve, tar_at_far
from gbcosface.eval.cli import run

TARGETS = {"IJBC": "ijbc", "IJBB": "ijbb"}


@dataclass
class IJBMeta:
    """Rows of the 5pts file (``names``, ``landmarks [N,5,2]``, ``det_scores``); per face row of
    the tid_mid file, its image index into those rows, template and media; the pairs."""

    names: list[str]
    landmarks: np.ndarray
    det_scores: np.ndarray
    face_image: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray


def _rows(path: Path, n_fields: int | None, min_fields: int = 1) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if (n_fields is not None and len(fields) != n_fields) or len(fields) < min_fields:
            want = n_fields if n_fields is not None else f">= {min_fields}"
            raise ValueError(f"{path}:{lineno}: expected {want} fields, got {len(fields)}: {line!r}")
        rows.append(fields)
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows


def _numbers(path: Path, rows: list[list[str]], cols: slice, dtype: type) -> np.ndarray:
    try:
        return np.array([[dtype(v) for v in r[cols]] for r in rows])
    except ValueError as exc:
        raise ValueError(f"{path}: non-numeric field: {exc}") from None


def read_meta(root: str | Path, target: str) -> IJBMeta:
    """Parse the three meta files of ``target`` (``IJBC`` / ``IJBB``) under ``root/meta``."""
    if target not in TARGETS:
        raise ValueError(f"unknown IJB target {target!r}; known: {', '.join(TARGETS)}")
    meta = Path(root) / "meta"
    p = TARGETS[target]
    lmk_path = meta / f"{p}_name_5pts_score.txt"
    lmk_rows = _rows(lmk_path, 12)
    names = [r[0] for r in lmk_rows]
    vals = _numbers(lmk_path, lmk_rows, slice(1, 12), float)
    index = {}
    for i, name in enumerate(names):
        if index.setdefault(name, i) != i:
            raise ValueError(f"{lmk_path}: image {name!r} is listed twice")

    tid_path = meta / f"{p}_face_tid_mid.txt"
    tid_rows = _rows(tid_path, None, min_fields=3)
    missing = [r[0] for r in tid_rows if r[0] not in index]
    if missing:
        raise ValueError(f"{tid_path}: {len(missing)} image(s) have no landmarks in {lmk_path.name}, "
                         f"e.g. {missing[0]!r}")
    ids = _numbers(tid_path, tid_rows, slice(1, 3), int)

    pair_path = meta / f"{p}_template_pair_label.txt"
    pair_rows = _rows(pair_path, 3)
    pairs = _numbers(pair_path, pair_rows, slice(0, 3), int)
    return IJBMeta(names, vals[:, :10].reshape(-1, 5, 2), vals[:, 10],
                   np.array([index[r[0]] for r in tid_rows]), ids[:, 0], ids[:, 1],
                   pairs[:, :2], pairs[:, 2].astype(bool))


class AlignedFaces(Dataset):
    """Aligned uint8 ``[3, 112, 112]`` crops of the listed rows of the 5pts file."""

    def __init__(self, image_dir: Path, names: list[str], landmarks: np.ndarray, rows: np.ndarray) -> None:
        self.image_dir, self.names, self.landmarks, self.rows = image_dir, names, landmarks, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        row = int(self.rows[i])
        path = self.image_dir / self.names[row]
        try:
            with Image.open(path) as img:
                face = align_face(img, self.landmarks[row])
        except OSError as exc:
            raise ValueError(f"IJB image {path} cannot be read: {exc}") from None
        return torch.from_numpy(face.transpose(2, 0, 1).copy())


def extract_image_features(model: nn.Module, root: str | Path, meta: IJBMeta, ctx: DistContext,
                           batch_size: int = 128, workers: int = 4, progress: bool = True) -> np.ndarray:
    """Flip-test features ``[N, D]`` (raw, float32) of every row of the 5pts file; every rank
    embeds its share and receives all rows."""
    n = len(meta.names)
    rows = rank_indices(n, ctx)
    data = AlignedFaces(Path(root) / "loose_crop", meta.names, meta.landmarks, rows)
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, shuffle=False)
    bar = Progress(len(rows), desc="IJB features" + (f" (rank 0 of {ctx.world_size})" if ctx.world_size > 1 else ""),
                   unit="img", every_s=1.0, enabled=progress and ctx.is_main)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        local = torch.cat([flip_embed(model, b, ctx.device) for b in bar.wrap(loader)])
    finally:
        model.train(was_training)
    return gather_rows(local, n, ctx).cpu().numpy()


def face_features(image_features: np.ndarray, meta: IJBMeta, normalise_images: bool = False) -> np.ndarray:
    """Per face row of the tid_mid file: its image feature, optionally L2-normalised, times
    the detector score."""
    feats = np.asarray(image_features, dtype=np.float64)[meta.face_image]
    if normalise_images:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return feats * meta.det_scores[meta.face_image][:, None]


def _segment_sums(values: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Row sums over runs of equal keys (``sorted_keys`` non-decreasing, every run non-empty)."""
    starts = np.r_[0, np.nonzero(np.diff(sorted_keys))[0] + 1]
    return np.add.reduceat(values, starts, axis=0)


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(template ids, L2-normalised features)``: per template, the sum over its media of
    the mean feature of that media's faces."""
    # Groups are the distinct (template, media) rows, sorted by template first.
    groups, g_inv = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
    g_inv = g_inv.ravel()
    order = np.argsort(g_inv, kind="stable")
    media_means = _segment_sums(feats[order], g_inv[order]) / np.bincount(g_inv)[:, None]
    out = _segment_sums(media_means, groups[:, 0])
    tids = np.unique(groups[:, 0])
    return tids, out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def pair_scores(tids: np.ndarray, tfeats: np.ndarray, pairs: np.ndarray, pair_file: str = "pair file",
                chunk: int = 100_000) -> np.ndarray:
    """Cosine of each pair's template features (templates looked up by id), ``chunk`` pairs at
    a time: IJB-C has 15.7M pairs, too many to gather at once."""
    pos = np.searchsorted(tids, pairs)
    pos_c = np.minimum(pos, len(tids) - 1)
    unknown = tids[pos_c] != pairs
    if unknown.any():
        raise ValueError(f"{pair_file}: template {int(pairs[unknown][0])} has no faces in the tid_mid file "
                         f"({int(unknown.any(axis=1).sum())} pair(s) affected)")
    scores = np.empty(len(pairs))
    for i in range(0, len(pairs), chunk):
        a, b = pos_c[i:i + chunk, 0], pos_c[i:i + chunk, 1]
        scores[i:i + chunk] = np.einsum("ij,ij->i", tfeats[a], tfeats[b])
    return scores


def evaluate(image_features: np.ndarray, meta: IJBMeta, normalise_images: bool = False,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(template ids, template features, pair scores)`` from per-image features."""
    tids, tfeats = template_features(face_features(image_features, meta, normalise_images),
                                     meta.templates, meta.medias)
    return tids, tfeats, pair_scores(tids, tfeats, meta.pairs)


def main(argv: Sequence[str] | None = None) -> int:
    from gbcosface.export import load_backbone

    p = argparse.ArgumentParser(prog="python -m gbcosface.eval.ijb", description="IJB-B/C 1:1 verification")
    p.add_argument("--checkpoint", required=True, help="backbone export (model.pt from gbcosface.export)")
    p.add_argument("--backbone", help="backbone name, only for a plain state-dict checkpoint")
    p.add_argument("--root", required=True, help="dataset folder holding loose_crop/ and meta/")
    p.add_argument("--target", default="IJBC", choices=sorted(TARGETS))
    p.add_argument("--output", help="results folder (default: ijb_results/<target>)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=4, help="image loading processes per rank")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--normalise-images", action="store_true",
                   help="L2-normalise each image feature before detector weighting")
    args = p.parse_args(argv)
    meta = read_meta(args.root, args.target)
    if not (Path(args.root) / "loose_crop").is_dir():
        raise FileNotFoundError(f"{Path(args.root) / 'loose_crop'}: image folder not found")
    out = Path(args.output or Path("ijb_results") / args.target)
    ctx = init_distributed(device=args.device)
    try:
        model = load_backbone(args.checkpoint, name=args.backbone).to(ctx.device)
        feats = extract_image_features(model, args.root, meta, ctx, args.batch_size, args.workers)
        if ctx.is_main:
            tids, tfeats, scores = evaluate(feats, meta, args.normalise_images)
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / "image_features.npy", feats)
            np.save(out / "template_ids.npy", tids)
            np.save(out / "template_features.npy", tfeats.astype(np.float32))
            np.save(out / "scores.npy", scores)
            np.save(out / "labels.npy", meta.labels)
            tars = tar_at_far(scores, meta.labels, DEFAULT_FARS)
            (out / "tar_at_far.json").write_text(json.dumps({f"{k:.0e}": v for k, v in tars.items()}, indent=2))
            fpr, tpr, _ = roc_curve(scores, meta.labels)
            plot_roc({args.target: (fpr, tpr)}, out / "roc.png", title=f"{args.target} 1:1 verification")
            print(format_table({args.target: (tars, min_resolvable_far(meta.labels))}))
            print(f"results in {out}")
    finally:
        teardown(ctx)
    return 0


if __name__ == "__main__":
    exit_process(run(main))
