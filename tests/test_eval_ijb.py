"""IJB-style 1:1 evaluation: Umeyama fit, alignment warp, aggregation, a miniature end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gbcosface.backbones import build_backbone
from gbcosface.eval import ijb
from gbcosface.eval.align import ARCFACE_TEMPLATE, align_face, umeyama
from gbcosface.export import save_backbone


def _similarity(angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def _inverse(m: np.ndarray) -> np.ndarray:
    a_inv = np.linalg.inv(m[:, :2])
    return np.hstack([a_inv, (-a_inv @ m[:, 2])[:, None]])


def test_umeyama_recovers_similarity_and_is_least_squares() -> None:
    m = _similarity(0.4, 1.7, (12.0, -3.0))
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    np.testing.assert_allclose(umeyama(src, _apply(m, src)), m, atol=1e-9)
    # Noisy targets: compare with a linear least-squares fit of x' = a x - b y + tx, y' = b x + a y + ty.
    dst = _apply(m, src) + np.random.default_rng(1).normal(scale=2.0, size=src.shape)
    rows = []
    for (x, y) in src:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), dst.ravel(), rcond=None)[0]
    np.testing.assert_allclose(umeyama(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_align_face_matches_bilinear_reference() -> None:
    yy, xx = np.mgrid[0:200, 0:240]
    gray = (127 + 60 * np.sin(xx / 7.0) + 60 * np.cos(yy / 9.0)).astype(np.uint8)
    to_crop = _similarity(0.3, 0.8, (10.0, 30.0))  # image -> 112x112 crop
    landmarks = _apply(_inverse(to_crop), ARCFACE_TEMPLATE)
    out = align_face(Image.fromarray(np.stack([gray] * 3, -1)), landmarks)[..., 0].astype(float)
    # Reference: crop pixel p (centre at integer p) samples the image bilinearly at M^-1 p.
    oy, ox = np.mgrid[0:112, 0:112]
    q = _apply(_inverse(to_crop), np.stack([ox.ravel(), oy.ravel()], 1))
    x0, y0 = np.floor(q[:, 0]).astype(int), np.floor(q[:, 1]).astype(int)
    fx, fy = q[:, 0] - x0, q[:, 1] - y0
    inside = (x0 >= 0) & (y0 >= 0) & (x0 < 239) & (y0 < 199)
    x0, y0, f = np.clip(x0, 0, 238), np.clip(y0, 0, 198), gray.astype(float)
    ref = (f[y0, x0] * (1 - fx) * (1 - fy) + f[y0, x0 + 1] * fx * (1 - fy)
           + f[y0 + 1, x0] * (1 - fx) * fy + f[y0 + 1, x0 + 1] * fx * fy)
    assert inside.mean() > 0.5
    assert np.abs(out.ravel()[inside] - ref[inside]).max() <= 1.0  # uint8 rounding only
    assert np.all(out.ravel()[q[:, 0] < -1] == 0)  # black outside the source


def _meta(feats_rows: int) -> ijb.IJBMeta:
    # 5 images; faces: t1 = {media 10: img0, img1; media 11: img2}, t2 = {media 12: img3},
    # t3 = {media 10: img4, img0 (an image shared across templates)}.
    return ijb.IJBMeta(
        names=[f"{i}.jpg" for i in range(feats_rows)], landmarks=np.zeros((feats_rows, 5, 2)),
        det_scores=np.array([0.9, 0.5, 1.0, 0.8, 0.7]),
        face_image=np.array([0, 1, 2, 3, 4, 0]), templates=np.array([1, 1, 1, 2, 3, 3]),
        medias=np.array([10, 10, 11, 12, 10, 10]),
        pairs=np.array([[1, 2], [1, 3], [3, 2]]), labels=np.array([True, False, True]),
    )


def test_template_aggregation_by_hand() -> None:
    rng = np.random.default_rng(4)
    f = rng.normal(size=(5, 3))
    meta = _meta(5)
    tids, tfeats, scores = ijb.evaluate(f, meta)
    w = meta.det_scores[:, None] * f  # detector-weighted image features
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    t1 = unit((w[0] + w[1]) / 2 + w[2])
    t2 = unit(w[3])
    t3 = unit((w[4] + w[0]) / 2)
    np.testing.assert_array_equal(tids, [1, 2, 3])
    np.testing.assert_allclose(tfeats, [t1, t2, t3], atol=1e-12)
    np.testing.assert_allclose(scores, [t1 @ t2, t1 @ t3, t3 @ t2], atol=1e-12)
    # With per-image normalisation first, weights are the detector scores alone.
    n = f / np.linalg.norm(f, axis=1, keepdims=True) * meta.det_scores[:, None]
    _, _, s2 = ijb.evaluate(f, meta, normalise_images=True)
    assert s2[0] == pytest.approx(unit((n[0] + n[1]) / 2 + n[2]) @ unit(n[3]), abs=1e-12)


def test_unknown_template_in_pairs_is_named() -> None:
    meta = _meta(5)
    meta.pairs = np.array([[1, 7]])
    with pytest.raises(ValueError, match="template 7 has no faces"):
        ijb.evaluate(np.ones((5, 3)), meta)


def _face_image(rng: np.random.Generator, landmarks: np.ndarray, size: int = 160) -> Image.Image:
    img = rng.integers(60, 120, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for i, (x, y) in enumerate(landmarks):  # a coloured blob per landmark
        blob = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 18.0)
        img[..., i % 3] = np.clip(img[..., i % 3] + 130 * blob, 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def _make_ijb(root: Path, n_images: int = 9) -> list[np.ndarray]:
    """A miniature IJB-C: 9 images in 4 templates / 6 media, 5 pairs."""
    rng = np.random.default_rng(11)
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    lines, lmks = [], []
    for i in range(n_images):
        m = _similarity(rng.uniform(-0.3, 0.3), rng.uniform(1.0, 1.3), tuple(rng.uniform(5, 20, 2)))
        lmk = _apply(m, ARCFACE_TEMPLATE)
        lmks.append(lmk)
        _face_image(rng, lmk).save(root / "loose_crop" / f"{i + 1}.jpg", quality=95)
        lines.append(f"{i + 1}.jpg " + " ".join(f"{v:.3f}" for v in lmk.ravel()) + f" {0.5 + 0.05 * i:.3f}")
    (root / "meta/ijbc_name_5pts_score.txt").write_text("\n".join(lines) + "\n")
    tid_mid = [(1, 100), (1, 100), (1, 101), (2, 102), (2, 102), (3, 103), (3, 104), (3, 104), (4, 105)]
    (root / "meta/ijbc_face_tid_mid.txt").write_text(
        "".join(f"{i + 1}.jpg {t} {m}\n" for i, (t, m) in enumerate(tid_mid)))
    (root / "meta/ijbc_template_pair_label.txt").write_text("1 2 1\n1 3 0\n2 3 0\n3 4 1\n1 4 0\n")
    return lmks


def test_landmarks_land_on_the_template(tmp_path: Path) -> None:
    lmks = _make_ijb(tmp_path)
    with Image.open(tmp_path / "loose_crop/1.jpg") as img:
        face = align_face(img, lmks[0]).astype(float)
    for i, (x, y) in enumerate(ARCFACE_TEMPLATE):  # each blob's peak is at its template point
        ch = face[..., i % 3]
        window = ch[int(y) - 6:int(y) + 7, int(x) - 6:int(x) + 7]
        py, px = np.unravel_index(np.argmax(window), window.shape)
        assert abs(px + int(x) - 6 - x) <= 1.5 and abs(py + int(y) - 6 - y) <= 1.5


def test_miniature_ijb_end_to_end(tmp_path: Path, capsys) -> None:
    root, out = tmp_path / "IJBC", tmp_path / "out"
    lmks = _make_ijb(root)
    torch.manual_seed(0)
    model = build_backbone("tiny", 16, width=8)
    save_backbone(tmp_path / "model.pt", "tiny", model, backbone_kwargs={"width": 8})
    ijb.main(["--checkpoint", str(tmp_path / "model.pt"), "--root", str(root), "--target", "IJBC",
              "--output", str(out), "--workers", "0", "--batch-size", "4", "--device", "cpu"])
    text = capsys.readouterr().out
    assert "IJBC" in text and "1e-6" in text

    feats = np.load(out / "image_features.npy")
    model.eval()
    with Image.open(root / "loose_crop/5.jpg") as img:  # image features: flip-sum of the aligned crop
        x = torch.from_numpy(align_face(img, lmks[4]).transpose(2, 0, 1).copy()).float()[None] / 127.5 - 1
    with torch.no_grad():
        ref = model(x) + model(x.flip(-1))
    np.testing.assert_allclose(feats[4], ref[0].numpy(), rtol=1e-4, atol=1e-4)

    # Hand aggregation from the saved image features and the meta files.
    det = np.array([0.5 + 0.05 * i for i in range(9)])
    w = feats.astype(np.float64) * det[:, None]
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    t = {1: unit((w[0] + w[1]) / 2 + w[2]), 2: unit((w[3] + w[4]) / 2),
         3: unit(w[5] + (w[6] + w[7]) / 2), 4: unit(w[8])}
    pairs = [(1, 2), (1, 3), (2, 3), (3, 4), (1, 4)]
    np.testing.assert_allclose(np.load(out / "scores.npy"), [t[a] @ t[b] for a, b in pairs], atol=1e-6)
    np.testing.assert_array_equal(np.load(out / "labels.npy"), [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(np.load(out / "template_ids.npy"), [1, 2, 3, 4])
    assert set(json.loads((out / "tar_at_far.json").read_text())) == {"1e-06", "1e-05", "1e-04", "1e-03",
                                                                    "1e-02", "1e-01"}
    with Image.open(out / "roc.png") as png:
        assert png.size == (800, 600)


def test_meta_errors_name_file_and_line(tmp_path: Path) -> None:
    _make_ijb(tmp_path)
    f = tmp_path / "meta/ijbc_template_pair_label.txt"
    f.write_text("1 2 1\n1 3\n")
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label.txt:2: expected 3 fields"):
        ijb.read_meta(tmp_path, "IJBC")
    with pytest.raises(FileNotFoundError, match="ijbb_name_5pts_score.txt"):
        ijb.read_meta(tmp_path, "IJBB")
    with pytest.raises(ValueError, match="unknown IJB target 'IJBA'"):
        ijb.read_meta(tmp_path, "IJBA")
    f.write_text("1 2 1\n")
    (tmp_path / "meta/ijbc_face_tid_mid.txt").write_text("1.jpg 1 1\n99.jpg 2 2\n")
    with pytest.raises(ValueError, match=r"ijbc_face_tid_mid.txt: 1 image\(s\) have no landmarks.*99.jpg"):
        ijb.read_meta(tmp_path, "IJBC")


def _rank_extract(ctx, root: str, out_dir: str) -> None:
    torch.manual_seed(0)
    model = build_backbone("tiny", 16, width=8)
    meta = ijb.read_meta(root, "IJBC")
    feats = ijb.extract_image_features(model, root, meta, ctx, batch_size=2, workers=0, progress=False)
    np.save(Path(out_dir) / f"feats{ctx.rank}.npy", feats)


@pytest.mark.slow
def test_extraction_split_across_ranks(tmp_path: Path) -> None:
    from gbcosface.distributed import DistContext
    from tests.dist_utils import run_ranks

    root = tmp_path / "IJBC"
    _make_ijb(root)
    run_ranks(_rank_extract, 2, tmp_path, str(root), str(tmp_path))  # 9 images: 5 + 4 (padded)
    (tmp_path / "single").mkdir()
    _rank_extract(DistContext(), str(root), str(tmp_path / "single"))
    ref = np.load(tmp_path / "single/feats0.npy")
    for r in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"feats{r}.npy"), ref, rtol=1e-5, atol=1e-5)
