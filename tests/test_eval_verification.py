"""InsightFace .bin pair sets: Python 2/3 pickles, the 10-fold protocol, ranks split/gather."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gbcosface.backbones import build_backbone
from gbcosface.distributed import DistContext
from gbcosface.eval.verification import embed_images, evaluate, kfold_accuracy, load_bin, verify
from tests.dist_utils import run_ranks
from tests.optional import require


def _images(n: int, seed: int = 0, size: int = 112) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")  # lossless: decoded pixels must match exactly
    return buf.getvalue()


def _python2_pickle(blobs: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's cPickle.dump((bins, issame), f, protocol=2) writes: images as str
    (SHORT_BINSTRING / BINSTRING opcodes), bools as NEWTRUE / NEWFALSE."""
    out = bytearray(b"\x80\x02")  # PROTO 2
    out += b"]("  # EMPTY_LIST, MARK
    for b in blobs:
        out += (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b
    out += b"e"  # APPENDS
    out += b"](" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e"
    return bytes(out + b"\x86.")  # TUPLE2, STOP


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_python2_pickle_loads(tmp_path: Path) -> None:
    imgs = _images(6)
    issame = [True, False, True]
    raw = _python2_pickle([_png(i) for i in imgs], issame)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)  # the default ASCII decoding cannot read it: it really holds py2 str
    vset = load_bin(_write(tmp_path / "lfw.bin", raw))
    assert vset.name == "lfw" and len(vset) == 3
    np.testing.assert_array_equal(vset.issame, issame)
    np.testing.assert_array_equal(vset.images.numpy(), imgs.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("kind", ["latin1-str", "bytes", "ndarray"])
def test_python3_pickles_load(tmp_path: Path, kind: str) -> None:
    imgs = _images(4, seed=1)
    blobs = [_png(i) for i in imgs]
    entries = {"latin1-str": [b.decode("latin1") for b in blobs], "bytes": blobs,
               "ndarray": [np.frombuffer(b, dtype=np.uint8) for b in blobs]}[kind]
    protocol = 2 if kind == "latin1-str" else 4
    data = pickle.dumps((entries, [np.bool_(True), np.bool_(False)]), protocol=protocol)
    vset = load_bin(_write(tmp_path / "x.bin", data))
    np.testing.assert_array_equal(vset.images.numpy(), imgs.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(vset.issame, [True, False])


def test_jpeg_of_other_size_is_resized(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_images(1, size=128)[0]).save(buf, format="JPEG")
    vset = load_bin(_write(tmp_path / "j.bin", pickle.dumps(([buf.getvalue()] * 2, [True]))))
    assert vset.images.shape == (2, 3, 112, 112) and vset.images.dtype == torch.uint8


def test_bad_files_name_the_problem(tmp_path: Path) -> None:
    blob = _png(_images(1)[0])
    with pytest.raises(ValueError, match=r"odd\.bin: 3 images for 2 pairs"):
        load_bin(_write(tmp_path / "odd.bin", pickle.dumps(([blob] * 3, [True, False]))))
    with pytest.raises(ValueError, match=r"broken\.bin: image 1 cannot be decoded"):
        load_bin(_write(tmp_path / "broken.bin", pickle.dumps(([blob, b"not an image"], [True]))))
    with pytest.raises(ValueError, match=r"evil\.bin: not a readable .bin pickle"):
        load_bin(_write(tmp_path / "evil.bin", pickle.dumps((Path("x"), [True]))))
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_bin(tmp_path / "missing.bin")


def _pair_embeddings(n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    a = rng.normal(size=(n_pairs, 16))
    b = np.where(issame[:, None], a + rng.normal(scale=1.2, size=a.shape), rng.normal(size=a.shape))
    emb = np.empty((2 * n_pairs, 16))
    emb[0::2], emb[1::2] = a, b
    return emb, issame


def test_ten_fold_protocol_matches_independent_computation() -> None:
    model_selection = require("sklearn.model_selection")
    emb, issame = _pair_embeddings(613, seed=5)  # 613 pairs: uneven folds
    res = evaluate(emb, issame)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    dist = ((e[0::2] - e[1::2]) ** 2).sum(1)
    thresholds = np.arange(0, 4, 0.01)
    accs = []
    for train, test in model_selection.KFold(n_splits=10, shuffle=False).split(dist):
        train_acc = [np.mean((dist[train] < t) == issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean((dist[test] < best) == issame[test]))
    assert res.accuracy == pytest.approx(np.mean(accs), abs=1e-12)
    assert res.accuracy_std == pytest.approx(np.std(accs), abs=1e-12)
    np.testing.assert_allclose(res.scores, (e[0::2] * e[1::2]).sum(1), atol=1e-12)
    assert 0.6 < res.accuracy < 1.0  # the synthetic pairs are separable but not perfectly
    fold_acc, _ = kfold_accuracy(dist, issame)
    np.testing.assert_allclose(fold_acc, accs, atol=1e-12)


def _vset_and_model(n_pairs: int = 10):
    torch.manual_seed(0)
    model = build_backbone("tiny", 32, width=8)
    with torch.no_grad():  # non-trivial BN statistics so eval mode differs from train mode
        model(torch.randn(16, 3, 112, 112) * 0.5)
    images = torch.from_numpy(_images(2 * n_pairs, seed=2).transpose(0, 3, 1, 2).copy())
    return model, images, np.arange(n_pairs) % 2 == 0


def _reference_embeddings(model, images: torch.Tensor) -> torch.Tensor:
    model = model.eval()
    x = images.float() / 127.5 - 1.0
    with torch.no_grad():
        return model(x) + model(x.flip(-1))


def test_verify_single_process_uses_flip_sum_and_eval_mode() -> None:
    model, images, issame = _vset_and_model()
    model.train()
    emb = embed_images(model, images, DistContext(), batch_size=3, progress=False)
    assert model.training  # restored
    torch.testing.assert_close(emb, _reference_embeddings(model, images), rtol=1e-5, atol=1e-5)
    from gbcosface.eval.verification import VerificationSet

    wrapped = torch.nn.Module()
    wrapped.module = model  # DDP / DeepSpeed style: the backbone is evaluated unwrapped
    res = verify(wrapped, VerificationSet("v", images, issame), DistContext(), batch_size=4)
    ref = evaluate(_reference_embeddings(model, images).numpy(), issame)
    np.testing.assert_allclose(res.scores, ref.scores, atol=1e-6)


def _rank_embed(ctx: DistContext, out_dir: str) -> None:
    model, images, _ = _vset_and_model()
    emb = embed_images(model, images, ctx, batch_size=2, progress=False)
    torch.save(emb, Path(out_dir) / f"emb{ctx.rank}.pt")


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_and_gather(tmp_path: Path, world_size: int) -> None:
    run_ranks(_rank_embed, world_size, tmp_path, str(tmp_path))
    model, images, _ = _vset_and_model()
    ref = _reference_embeddings(model, images)
    for r in range(world_size):  # 20 images over 3 ranks: 7+7+6, the last padded
        torch.testing.assert_close(torch.load(tmp_path / f"emb{r}.pt"), ref, rtol=1e-5, atol=1e-5)


def test_cli_writes_scores(tmp_path: Path, capsys) -> None:
    from gbcosface.eval import verification
    from gbcosface.export import save_backbone

    model, images, issame = _vset_and_model(10)
    save_backbone(tmp_path / "model.pt", "tiny", model, backbone_kwargs={"width": 8})
    blobs = [_png(i) for i in images.numpy().transpose(0, 2, 3, 1)]
    _write(tmp_path / "pairs.bin", _python2_pickle(blobs, list(issame)))
    verification.main(["--checkpoint", str(tmp_path / "model.pt"), "--bin", str(tmp_path / "pairs.bin"),
                       "--device", "cpu", "--output", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert "pairs: accuracy" in text
    ref = evaluate(_reference_embeddings(model, images).numpy(), issame)
    np.testing.assert_allclose(np.load(tmp_path / "out/pairs/scores.npy"), ref.scores, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "out/pairs/labels.npy"), issame)
