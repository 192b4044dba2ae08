"""Synthetic face-like identities: a training .rec/.idx and held-out verification pairs.

No face data set can be downloaded where this project is developed, so demos and tests train on
procedurally drawn identities. Each identity is a structured 112x112 pattern (head and hair
shapes, eyes, brows, nose, mouth and a few identity-specific marks, from a seed derived from
``(seed, identity)``); colours come from small shared palettes so that colour alone does not
tell identities apart. Each sample of an identity varies in pose (rotation, scale, shift),
lighting (gain, colour cast, gamma), blur, noise and occlusion. Every image has its own seed
``(seed, identity, sample)``, so the output is identical for a seed whatever the worker count.

    python -m gbcosface.data.synthetic --out data/synth --identities 200 --images-per-identity 20

writes ``train.rec``, ``train.idx``, ``property`` and ``<val-name>.bin`` (InsightFace's
verification format: a pickle of ``(list of JPEG bytes, list of is-same bools)``, pair ``i`` is
images ``2i`` and ``2i+1``) built from identities that are not in the training set.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import sys
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from ..progress import Progress
from .images import encode_jpeg
from .pack import write_insightface, write_property

_SKIN = np.array([[224, 172, 105], [198, 134, 66], [141, 85, 36], [255, 219, 172], [241, 194, 125],
                  [160, 110, 80]], dtype=np.float32)
_HAIR = np.array([[30, 20, 10], [90, 60, 30], [200, 170, 100], [120, 120, 120], [60, 30, 20]], dtype=np.float32)
_BACKGROUND = np.array([[200, 200, 200], [90, 110, 140], [160, 180, 160], [230, 220, 200]], dtype=np.float32)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
             angle: float = 0.0) -> np.ndarray:
    """Soft (anti-aliased) ellipse mask in [0, 1]."""
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / rx
    v = (-(xx - cx) * s + (yy - cy) * c) / ry
    d = np.sqrt(u * u + v * v)
    return np.clip((1.0 - d) * min(rx, ry), 0.0, 1.0)


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float = 1.0) -> None:
    m = (mask * alpha)[..., None]
    img *= 1.0 - m
    img += m * colour


def identity_pattern(seed: int, identity: int, size: int = 112) -> np.ndarray:
    """The canonical float32 RGB ``[size, size, 3]`` pattern of one identity."""
    rng = np.random.default_rng([seed, identity, 0x1D])
    k = size / 112.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = _BACKGROUND[rng.integers(len(_BACKGROUND))] + rng.normal(0, 10, 3)
    skin = _SKIN[rng.integers(len(_SKIN))] + rng.normal(0, 8, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 8, 3)
    cx, cy = 56 * k + rng.normal(0, 2), 60 * k + rng.normal(0, 2)
    ry, rx = rng.uniform(40, 50) * k, rng.uniform(30, 40) * k
    # hair behind and above the head, of identity-specific extent and shape
    _paint(img, _ellipse(yy, xx, cy - ry * rng.uniform(0.25, 0.5), cx + rng.normal(0, 3),
                         ry * rng.uniform(0.6, 0.85), rx * rng.uniform(1.0, 1.2)), hair)
    _paint(img, _ellipse(yy, xx, cy, cx, ry, rx), skin)
    eye_y = cy - ry * rng.uniform(0.1, 0.3)
    eye_dx = rx * rng.uniform(0.35, 0.55)
    eye_ry, eye_rx = rng.uniform(2.5, 5) * k, rng.uniform(4, 8) * k
    eye_col = rng.uniform(0, 90, 3)
    tilt = rng.normal(0, 0.2)
    brow_gap = rng.uniform(6, 12) * k
    brow_col = hair * rng.uniform(0.5, 1.0)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        _paint(img, _ellipse(yy, xx, eye_y, ex, eye_ry * 1.6, eye_rx * 1.2, side * tilt), np.full(3, 245.0))
        _paint(img, _ellipse(yy, xx, eye_y, ex, eye_ry, eye_ry, 0.0), eye_col)
        _paint(img, _ellipse(yy, xx, eye_y - brow_gap, ex, 1.5 * k, eye_rx * 1.4, -side * tilt * 2), brow_col)
    nose_len = rng.uniform(8, 16) * k
    _paint(img, _ellipse(yy, xx, eye_y + nose_len, cx + rng.normal(0, 1.5), nose_len * 0.6,
                         rng.uniform(3, 6) * k), skin * 0.75)
    mouth_y = cy + ry * rng.uniform(0.4, 0.6)
    _paint(img, _ellipse(yy, xx, mouth_y, cx, rng.uniform(2, 5) * k, rng.uniform(7, 15) * k, rng.normal(0, 0.1)),
           np.array([150.0, 40, 50]) + rng.normal(0, 20, 3))
    for _ in range(int(rng.integers(3, 7))):  # identity-specific marks (moles, scars, glasses-like shapes)
        angle = rng.uniform(0, 2 * np.pi)
        r = rng.uniform(0.2, 0.85)
        _paint(img, _ellipse(yy, xx, cy + r * ry * np.sin(angle), cx + r * rx * np.cos(angle),
                             rng.uniform(1.5, 6) * k, rng.uniform(1.5, 8) * k, rng.uniform(0, np.pi)),
               rng.uniform(0, 255, 3), alpha=rng.uniform(0.5, 1.0))
    return np.clip(img, 0, 255)


def render_sample(pattern: np.ndarray, seed: int, identity: int, sample: int, hard: bool = True) -> np.ndarray:
    """One uint8 RGB sample of an identity: pose, lighting, blur, noise and occlusion vary."""
    rng = np.random.default_rng([seed, identity, sample, 0x5A])
    size = pattern.shape[0]
    img = Image.fromarray(pattern.astype(np.uint8), "RGB")
    angle = rng.normal(0, 6 if hard else 3)
    scale = rng.uniform(0.92, 1.08) if hard else 1.0
    shift = rng.normal(0, 3 if hard else 1.5, 2)
    c, s = np.cos(np.radians(angle)) / scale, np.sin(np.radians(angle)) / scale
    centre = size / 2.0
    # inverse affine map (output pixel -> input pixel) around the centre
    a, b, d, e = c, s, -s, c
    tx = centre - a * (centre + shift[0]) - b * (centre + shift[1])
    ty = centre - d * (centre + shift[0]) - e * (centre + shift[1])
    fill = tuple(int(v) for v in pattern[0, 0])
    img = img.transform((size, size), Image.AFFINE, (a, b, tx, d, e, ty), resample=Image.BILINEAR, fillcolor=fill)
    sigma = rng.uniform(0, 1.2) if hard else 0.0
    if sigma > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(sigma))
    x = np.asarray(img, dtype=np.float32) / 255.0
    gain = rng.uniform(0.7, 1.3) * (1 + rng.normal(0, 0.06, 3))
    gamma = rng.uniform(0.8, 1.25)
    x = np.clip(x * gain, 0, 1) ** gamma
    x = x * 255.0 + rng.normal(0, rng.uniform(0, 8), x.shape)
    if hard and rng.random() < 0.3:  # occluder: a flat or noisy patch
        h, w = rng.integers(12, 40, 2)
        y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
        x[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3) + rng.normal(0, 10, (h, w, 3))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _encode_identity(args: tuple) -> list[bytes]:
    seed, identity, samples, size, quality = args
    pattern = identity_pattern(seed, identity, size)
    return [encode_jpeg(render_sample(pattern, seed, identity, j), quality) for j in samples]


def _pool_map(jobs: Sequence[tuple], workers: int, progress: Progress):
    if workers <= 1:
        for job in jobs:
            out = _encode_identity(job)
            progress.update(len(out))
            yield out
        return
    with mp.get_context().Pool(workers) as pool:
        for out in pool.imap(_encode_identity, jobs, chunksize=4):
            progress.update(len(out))
            yield out


def make_verification_pairs(seed: int, identities: Sequence[int], num_pairs: int, size: int = 112,
                            quality: int = 90, workers: int = 1, progress: Progress | None = None
                            ) -> tuple[list[bytes], list[bool]]:
    """Half same-identity, half different-identity pairs (alternating), images ``2i, 2i+1``."""
    if len(identities) < 2:
        raise ValueError("verification pairs need at least 2 held-out identities")
    rng = np.random.default_rng([seed, 0xB1])
    per_id: dict[int, list[int]] = {}
    plan = []
    for i in range(num_pairs):
        same = i % 2 == 0
        a, b = (rng.choice(identities, 2, replace=False) if not same else [rng.choice(identities)] * 2)
        plan.append(((int(a), int(b)), same))
        for ident in (int(a), int(b)):
            samples = per_id.setdefault(ident, [])
            samples.append(1000 + len(samples))  # sample indices unused by any training image
    jobs = [(seed, ident, samples, size, quality) for ident, samples in sorted(per_id.items())]
    progress = progress or Progress(sum(len(j[2]) for j in jobs), enabled=False)
    images = {ident: iter(out) for (_, ident, *_), out in zip(jobs, _pool_map(jobs, workers, progress))}
    bins, issame = [], []
    for (a, b), same in plan:
        bins += [next(images[a]), next(images[b])]
        issame.append(same)
    return bins, issame


def generate(out_dir: str | os.PathLike, *, identities: int = 200, images_per_identity: int = 20, seed: int = 0,
             val_identities: int = 50, val_pairs: int = 600, val_name: str = "synth_val", size: int = 112,
             quality: int = 90, workers: int = 1, verbose: bool = True) -> dict:
    """Write the training set and the verification set; returns their paths and counts."""
    if identities < 1 or images_per_identity < 1:
        raise ValueError("--identities and --images-per-identity must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    total = identities * images_per_identity
    progress = Progress(total, desc="synthetic train", unit="img", enabled=verbose, every_s=5)
    jobs = [(seed, i, range(images_per_identity), size, quality) for i in range(identities)]
    labels = [i for i in range(identities) for _ in range(images_per_identity)]
    jpegs = (img for out in _pool_map(jobs, workers, progress) for img in out)
    rec, idx = os.path.join(out_dir, "train.rec"), os.path.join(out_dir, "train.idx")
    write_insightface(rec, idx, labels, jpegs, identities)
    write_property(out_dir, identities, size, size)
    result = {"rec": rec, "idx": idx, "classes": identities, "images": total}
    if val_pairs > 0:
        held_out = list(range(identities, identities + val_identities))
        vprog = Progress(2 * val_pairs, desc="synthetic val", unit="img", enabled=verbose, every_s=5)
        bins, issame = make_verification_pairs(seed, held_out, val_pairs, size, quality, workers, vprog)
        path = os.path.join(out_dir, f"{val_name}.bin")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump((bins, issame), f, protocol=4)
        os.replace(tmp, path)
        result.update(val=path, val_pairs=val_pairs)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gbcosface.data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--identities", type=int, default=200)
    p.add_argument("--images-per-identity", type=int, default=20)
    p.add_argument("--val-identities", type=int, default=50, help="held-out identities for the pairs")
    p.add_argument("--val-pairs", type=int, default=600, help="0 writes no verification set")
    p.add_argument("--val-name", default="synth_val", help="name of the .bin file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = p.parse_args(argv)
    try:
        res = generate(args.out, identities=args.identities, images_per_identity=args.images_per_identity,
                       seed=args.seed, val_identities=args.val_identities, val_pairs=args.val_pairs,
                       val_name=args.val_name, size=args.image_size, quality=args.quality, workers=args.workers)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {res['images']} images of {res['classes']} identities to {res['rec']}"
          + (f"; {res['val_pairs']} pairs to {res['val']}" if "val" in res else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
