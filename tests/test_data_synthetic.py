"""Synthetic identities: deterministic by seed, InsightFace layout, held-out verification pairs."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gbcosface.data.images import decode_image
from gbcosface.data.recordio import RecordReader, detect_layout, first_label
from gbcosface.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]


def _make(out: Path, seed: int = 0, workers: int = 1, **kw) -> dict:
    args = dict(identities=4, images_per_identity=3, val_identities=3, val_pairs=6, seed=seed, workers=workers,
                verbose=False)
    args.update(kw)
    return generate(out, **args)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_deterministic_by_seed_and_worker_count(tmp_path):
    _make(tmp_path / "a", seed=5)
    _make(tmp_path / "b", seed=5, workers=2)
    _make(tmp_path / "c", seed=6)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert set(a) == {"train.rec", "train.idx", "property", "synth_val.bin"}
    assert a == b
    assert a["train.rec"] != c["train.rec"] and a["synth_val.bin"] != c["synth_val.bin"]


def test_training_set_layout(tmp_path):
    res = _make(tmp_path)
    assert (tmp_path / "property").read_text().strip() == "4,112,112"
    reader = RecordReader(res["rec"], res["idx"])
    layout = detect_layout(reader)
    assert layout.kind == "insightface" and len(layout.image_keys) == 12 and len(layout.identity_keys) == 4
    labels = [first_label(reader[k][0]) for k in layout.image_keys.tolist()]
    assert labels == [float(i // 3) for i in range(12)]
    imgs = [decode_image(reader[k][1]) for k in layout.image_keys.tolist()]
    assert all(im.shape == (112, 112, 3) and im.dtype == np.uint8 for im in imgs)
    # samples of one identity differ (augmentation), and are closer to each other than to others on average
    x = np.stack(imgs).astype(np.float32).reshape(4, 3, -1)
    assert all(not np.array_equal(x[i, 0], x[i, 1]) for i in range(4))


def test_verification_pairs_format(tmp_path):
    res = _make(tmp_path, val_pairs=10)
    with open(res["val"], "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    assert len(bins) == 20 and len(issame) == 10
    assert all(isinstance(b, bytes) and b[:2] == b"\xff\xd8" for b in bins)
    assert issame.count(True) == 5 and issame.count(False) == 5
    assert all(isinstance(s, bool) for s in issame)
    # held out: no verification image equals any training image
    reader = RecordReader(res["rec"], res["idx"])
    train = {reader[k][1] for k in detect_layout(reader).image_keys.tolist()}
    assert not train & set(bins)
    # same-identity pairs look more alike than different-identity pairs (a weak, label-free check)
    d = [np.abs(decode_image(bins[2 * i]).astype(float) - decode_image(bins[2 * i + 1])).mean() for i in range(10)]
    same = np.mean([v for v, s in zip(d, issame) if s])
    diff = np.mean([v for v, s in zip(d, issame) if not s])
    assert same < diff


def test_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gbcosface.data.synthetic", "--out", str(tmp_path), "--identities", "3",
                        "--images-per-identity", "2", "--val-identities", "2", "--val-pairs", "4", "--workers", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 6 images of 3 identities" in r.stdout and (tmp_path / "synth_val.bin").exists()
    r = subprocess.run([sys.executable, "-m", "gbcosface.data.synthetic", "--out", str(tmp_path), "--identities", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--identities" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_identities_are_learnable_but_not_by_colour(tmp_path):
    """A tiny CNN learns identity from held-out samples well above chance; mean colour alone does not."""
    from gbcosface.data.torch_loader import RecordDataset

    ids, per = 20, 12
    res = generate(tmp_path, identities=ids, images_per_identity=per, val_pairs=0, workers=2, verbose=False)
    ds = RecordDataset(res["rec"], res["idx"])
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    x, y = torch.stack(xs), torch.tensor(ys)
    test = torch.arange(len(ds)) % per >= per - 3  # last 3 samples of each identity held out
    # colour baseline: nearest class mean of the per-image mean colour
    col = x.mean(dim=(2, 3))
    centres = torch.stack([col[~test & (y == c)].mean(0) for c in range(ids)])
    colour_acc = (torch.cdist(col[test], centres).argmin(1) == y[test]).float().mean().item()
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 5, stride=2, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(256, ids))
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    xtr, ytr = x[~test], y[~test]
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        perm = torch.randperm(len(xtr), generator=g)
        for b in range(0, len(perm), 32):
            i = perm[b:b + 32]
            flip = torch.rand(len(i), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xtr[i].flip(3), xtr[i])
            loss = torch.nn.functional.cross_entropy(net(xb), ytr[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.6, (acc, colour_acc)
    assert colour_acc < acc - 0.2, (acc, colour_acc)
