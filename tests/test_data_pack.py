"""pack / shuffle / inspect / reindex on a tiny folder of identities, and their bad-input messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gbcosface.data import pack as tools
from gbcosface.data.images import decode_image
from gbcosface.data.recordio import RecordReader, detect_layout, first_label

ROOT = Path(__file__).resolve().parents[1]


def _face(seed: int, size: int) -> np.ndarray:
    """A smooth seeded picture (JPEG keeps it close, unlike noise)."""
    f = np.random.default_rng(seed).uniform(1, 4, (3, 2))
    yy, xx = np.mgrid[0:size, 0:size] / size
    chans = [127.5 + 120 * np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy)) for c in range(3)]
    return np.stack(chans, -1).astype(np.uint8)


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, str]]]:
    """3 identities (folder names sort as b, c, d -> labels 0, 1, 2): 112 JPEGs pass through
    unchanged, a 112 PNG and a 128 JPEG are re-encoded. Returns the truth: file -> (label, kind)."""
    root = tmp_path / "faces"
    truth = {}
    for label, (name, n) in enumerate([("b_id", 3), ("c_id", 2), ("d_id", 4)]):
        (root / name).mkdir(parents=True)
        for j in range(n):
            seed = label * 10 + j
            if j == 1:
                p = root / name / f"{j}.png"
                Image.fromarray(_face(seed, 112)).save(p)
                kind = "png"
            elif j == 2:
                p = root / name / f"{j}.jpg"
                Image.fromarray(_face(seed, 128)).save(p, quality=95)
                kind = "resize"
            else:
                p = root / name / f"{j}.jpg"
                Image.fromarray(_face(seed, 112)).save(p, quality=90)
                kind = "jpeg"
            truth[str(p)] = (label, kind)
    (root / "b_id" / "notes.txt").write_text("not an image")
    return root, truth


@pytest.mark.parametrize("workers", [1, 2])
def test_pack_folder_insightface_layout(tmp_path, folder, workers):
    root, truth = folder
    res = tools.pack(root, tmp_path / "out" / "train", workers=workers, verbose=False)
    assert (res["images"], res["classes"]) == (9, 3)
    assert (tmp_path / "out" / "property").read_text().strip() == "3,112,112"
    reader = RecordReader(tmp_path / "out" / "train.rec")
    layout = detect_layout(reader)
    assert layout.kind == "insightface"
    assert layout.image_keys.tolist() == list(range(1, 10))
    assert layout.identity_keys.tolist() == [10, 11, 12]
    files = sorted(truth, key=lambda p: (truth[p][0], p))  # sorted by label, then by name
    for key, path in zip(layout.image_keys.tolist(), files):
        header, payload = reader[key]
        assert first_label(header) == truth[path][0]
        kind = truth[path][1]
        if kind == "jpeg":
            assert payload == Path(path).read_bytes()  # untouched
        else:
            img = decode_image(payload)
            assert img.shape == (112, 112, 3)
            src = np.asarray(Image.open(path).convert("RGB").resize((112, 112), Image.BILINEAR), dtype=np.float32)
            assert np.abs(img.astype(np.float32) - src).mean() < 3  # JPEG re-encode of the same picture
    # identity records: label = [first key, one past the last] of that identity
    starts = {0: 1, 1: 4, 2: 6}
    counts = {0: 3, 1: 2, 2: 4}
    for c, key in enumerate(layout.identity_keys.tolist()):
        header, payload = reader[key]
        assert header.label.tolist() == [starts[c], starts[c] + counts[c]] and payload == b""


def test_pack_list_file(tmp_path, folder):
    root, truth = folder
    lst = tmp_path / "train.lst"
    # im2rec style (index, label, path) and plain (path, label), relative to --root
    lines = [f"{i}\t{5 - lab}\t{os.path.relpath(p, root)}" for i, (p, (lab, _)) in enumerate(truth.items())]
    lst.write_text("\n".join(lines) + "\n")
    res = tools.pack(lst, tmp_path / "l" / "train", root=root, verbose=False)
    assert res["classes"] == 6  # labels 3..5: classes = max + 1, empty identities kept
    reader = RecordReader(tmp_path / "l" / "train.rec")
    got = sorted(first_label(reader[k][0]) for k in detect_layout(reader).image_keys.tolist())
    assert got == sorted(5.0 - lab for lab, _ in truth.values())


def test_shuffle_keeps_records_and_drops_header(tmp_path, folder):
    root, _ = folder
    tools.pack(root, tmp_path / "train", verbose=False)
    src = RecordReader(tmp_path / "train.rec")
    tools.shuffle(tmp_path / "train.rec", tmp_path / "shuf" / "train", seed=3, verbose=False)
    out = RecordReader(tmp_path / "shuf" / "train.rec")
    assert out.keys() == list(range(9))
    assert detect_layout(out).kind == "plain"
    src_raw = sorted(src.read_raw(k) for k in range(1, 10))
    out_raw = [out.read_raw(k) for k in range(9)]
    assert sorted(out_raw) == src_raw
    assert out_raw != [src.read_raw(k) for k in range(1, 10)]  # the order changed
    tools.shuffle(tmp_path / "train.rec", tmp_path / "again" / "train", seed=3, verbose=False)
    assert (tmp_path / "again" / "train.rec").read_bytes() == (tmp_path / "shuf" / "train.rec").read_bytes()
    assert (tmp_path / "shuf" / "property").read_text().strip() == "3,112,112"


def test_reindex_rebuilds_same_index(tmp_path, folder):
    root, _ = folder
    tools.pack(root, tmp_path / "train", verbose=False)
    original = (tmp_path / "train.idx").read_text()
    with pytest.raises(tools.DataToolError, match="--force"):
        tools.reindex(tmp_path / "train.rec")
    (tmp_path / "train.idx").unlink()
    assert tools.reindex(tmp_path / "train.rec")["records"] == 13
    assert (tmp_path / "train.idx").read_text() == original


def test_inspect_reports_counts(tmp_path, folder):
    root, _ = folder
    tools.pack(root, tmp_path / "train", verbose=False)
    info = tools.inspect(tmp_path / "train.rec", show=2, check=True)
    assert (info["layout"], info["images"], info["identity_records"], info["records"]) == ("insightface", 9, 3, 13)
    assert (info["classes_seen"], info["label_min"], info["label_max"]) == (3, 0.0, 2.0)
    assert info["property"] == (3, 112, 112) and info["corrupt"] == []
    assert [r["key"] for r in info["first"]] == [1, 2] and info["first"][0]["image"] == (112, 112, 3)


def test_cli_end_to_end(tmp_path, folder):
    root, _ = folder

    def run(*args):
        return subprocess.run([sys.executable, "-m", "gbcosface.data.pack", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    r = run("pack", root, tmp_path / "train", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "packed 9 images of 3 classes" in r.stdout and "img/s" in r.stderr
    r = run("inspect", tmp_path / "train.rec", "--check")
    assert r.returncode == 0 and "insightface" in r.stdout and "corrupt: 0" in r.stdout
    r = run("shuffle", tmp_path / "train.rec", tmp_path / "s")
    assert r.returncode == 0 and "9 shuffled" in r.stdout
    (tmp_path / "train.idx").unlink()
    r = run("inspect", tmp_path / "train.rec")
    assert r.returncode == 2 and "train.idx" in r.stderr and "reindex" in r.stderr and "Traceback" not in r.stderr
    assert run("reindex", tmp_path / "train.rec").returncode == 0


def test_bad_inputs_name_the_file(tmp_path, folder):
    root, _ = folder
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(tools.DataToolError, match="no identity sub-folders"):
        tools.pack(empty, tmp_path / "x", verbose=False)
    (empty / "id0").mkdir()
    with pytest.raises(tools.DataToolError, match="id0: identity folder has no images"):
        tools.pack(empty, tmp_path / "x", verbose=False)
    broken = root / "c_id" / "9.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(tools.DataToolError, match=r"c_id/9\.jpg: undecodable"):
        tools.pack(root, tmp_path / "x", verbose=False)
    broken.unlink()
    lst = tmp_path / "bad.lst"
    lst.write_text("a.jpg\t0\nb.jpg\tcat\n")
    with pytest.raises(tools.DataToolError, match=r"bad\.lst: line 2"):
        tools.pack(lst, tmp_path / "x", verbose=False)
    assert not (tmp_path / "x.rec").exists()  # nothing half-written


def test_inspect_check_reports_corrupt_record(tmp_path, folder):
    root, _ = folder
    tools.pack(root, tmp_path / "train", verbose=False)
    reader = RecordReader(tmp_path / "train.rec")
    off = reader.offset(2)
    data = bytearray((tmp_path / "train.rec").read_bytes())
    data[off + 8 + 24 + 20: off + 8 + 24 + 400] = b"\0" * 380  # wreck the JPEG body of key 2
    (tmp_path / "train.rec").write_bytes(bytes(data))
    info = tools.inspect(tmp_path / "train.rec", check=True)
    assert len(info["corrupt"]) == 1
    assert f"record key 2 at byte offset {off}" in info["corrupt"][0]


def test_packed_folder_through_loaders(tmp_path, folder):
    """pack -> torch loader (and DALI when installed): the labels and pixels of the source files."""
    import torch

    from gbcosface.data import build_loader
    from gbcosface.data.torch_loader import RecordDataset

    root, truth = folder
    tools.pack(root, tmp_path / "train", verbose=False)
    files = sorted(truth, key=lambda p: (truth[p][0], p))
    ds = RecordDataset(tmp_path / "train.rec", num_classes=3)
    for i, path in enumerate(files):
        x, label = ds[i]
        assert label == truth[path][0]
        if truth[path][1] == "jpeg":  # passed through: decodes exactly like the source file
            src = torch.from_numpy(decode_image(Path(path).read_bytes()).astype(np.float32)).permute(2, 0, 1)
            torch.testing.assert_close(x, (src - 127.5) / 127.5, rtol=0, atol=0)
    loader = build_loader("torch", batch_size=3, rec=str(tmp_path / "train.rec"), num_classes=3, num_workers=0)
    labels = sorted(torch.cat([y for _, y in loader]).tolist())
    assert labels == sorted(lab for lab, _ in truth.values())
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return
    dali = build_loader("dali", batch_size=3, rec=str(tmp_path / "train.rec"), num_classes=3, num_threads=1,
                        index_dir=str(tmp_path / "dali"))
    assert sorted(torch.cat([y for _, y in dali]).tolist()) == labels
