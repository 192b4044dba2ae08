"""Torch loader, sharded sampler, resume, DALI on CPU and the synthetic backend."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gbcosface.data import build_loader
from gbcosface.data.recordio import CorruptRecordError, IRHeader, RecordReader, RecordWriter
from gbcosface.data.synthetic import generate
from gbcosface.data.torch_loader import RecordDataset, ShardedBatchSampler, TorchLoader
from tests.optional import require

IDS, PER_ID = 6, 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, identities=IDS, images_per_identity=PER_ID, val_pairs=0, workers=1, verbose=False)
    return out


def _pil_tensor(payload: bytes) -> torch.Tensor:
    """Independent reference: Pillow decode, HWC -> CHW, (x - 127.5) / 127.5 in float64."""
    arr = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"), dtype=np.float64)
    return torch.from_numpy((arr - 127.5) / 127.5).permute(2, 0, 1)


def test_dataset_normalises_and_flips(synth):
    ds = RecordDataset(synth / "train.rec", num_classes=IDS, decoder="pillow")
    reader = RecordReader(synth / "train.rec")
    assert len(ds) == IDS * PER_ID
    for i in (0, 5, len(ds) - 1):
        key = 1 + i  # InsightFace layout: images are keys 1..n in write order
        want = _pil_tensor(reader[key][1])
        x, label = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 112, 112)
        assert label == i // PER_ID
        torch.testing.assert_close(x.double(), want, rtol=0, atol=1e-6)
        xf, _ = ds[(i, True)]
        torch.testing.assert_close(xf.double(), want.flip(2), rtol=0, atol=1e-6)


def test_simplejpeg_and_pillow_agree(synth):
    pytest.importorskip("simplejpeg")
    a = RecordDataset(synth / "train.rec", decoder="pillow")
    b = RecordDataset(synth / "train.rec", decoder="simplejpeg")
    for i in (0, 7):
        torch.testing.assert_close(a[i][0], b[i][0], rtol=0, atol=3 / 127.5)


@pytest.mark.parametrize("n,batch,world", [(103, 4, 1), (103, 4, 2), (103, 5, 3), (48, 4, 4)])
def test_sampler_disjoint_cover_equal_batches(n, batch, world):
    per_epoch = {}
    for epoch in (0, 1):
        shards = [ShardedBatchSampler(n, batch, r, world, seed=7).epoch_batches(epoch)[0] for r in range(world)]
        steps = n // (batch * world)
        assert all(s.shape == (steps, batch) for s in shards)
        flat = np.concatenate([s.reshape(-1) for s in shards])
        assert len(np.unique(flat)) == len(flat) == steps * batch * world  # disjoint
        assert flat.min() >= 0 and flat.max() < n
        per_epoch[epoch] = [s.tolist() for s in shards]
        again = [ShardedBatchSampler(n, batch, r, world, seed=7).epoch_batches(epoch)[0] for r in range(world)]
        assert [s.tolist() for s in again] == per_epoch[epoch]  # same seed, same epoch: same order
    assert per_epoch[0] != per_epoch[1]  # reshuffled each epoch
    if n % (batch * world) == 0:  # nothing dropped: the shards cover every sample
        assert sorted(np.concatenate([np.ravel(s) for s in per_epoch[0]]).tolist()) == list(range(n))


def test_sampler_flips_are_balanced_and_optional():
    s = ShardedBatchSampler(4000, 10, 0, 1, seed=1)
    assert 0.45 < s.epoch_batches(0)[1].mean() < 0.55
    assert not ShardedBatchSampler(40, 10, 0, 1, random_flip=False).epoch_batches(0)[1].any()


def test_sampler_rejects_too_few_samples():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ShardedBatchSampler(7, 4, 0, 2)


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_epoch_labels_and_resume(synth, workers):
    ds = RecordDataset(synth / "train.rec", num_classes=IDS)
    full = TorchLoader(ds, 4, 1, 2, seed=3, num_workers=workers)
    assert len(full) == IDS * PER_ID // 8
    epoch0 = _epoch(full)
    assert full.state_dict()["epoch"] == 1 and full.state_dict()["batches_consumed"] == 0
    epoch1 = _epoch(full)
    for x, y in epoch0:
        assert x.shape == (4, 3, 112, 112) and y.dtype == torch.int64 and y.shape == (4,)
    # labels match the indices the sampler chose (label of image i is i // PER_ID)
    idx0, flip0 = ShardedBatchSampler(len(ds), 4, 1, 2, seed=3).epoch_batches(0)
    assert torch.cat([y for _, y in epoch0]).tolist() == (idx0.reshape(-1) // PER_ID).tolist()
    # the batched (uint8 -> normalise once) path gives what the dataset gives per sample
    want = torch.stack([ds[(int(i), bool(f))][0] for i, f in zip(idx0[0], flip0[0])])
    torch.testing.assert_close(epoch0[0][0], want, rtol=0, atol=0)
    assert flip0.any() and not flip0.all()
    assert torch.cat([y for _, y in epoch1]).tolist() != torch.cat([y for _, y in epoch0]).tolist()

    # interrupt after 2 batches, save the position, resume in a fresh loader
    part = TorchLoader(ds, 4, 1, 2, seed=3, num_workers=workers)
    it = iter(part)
    first = [next(it) for _ in range(2)]
    state = part.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (0, 2)
    resumed = TorchLoader(ds, 4, 1, 2, seed=3, num_workers=workers)
    resumed.load_state_dict(state)
    rest = _epoch(resumed)
    assert len(first) + len(rest) == len(full)
    for (xa, ya), (xb, yb) in zip(first + rest, epoch0):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        assert torch.equal(ya, yb)
    assert resumed.state_dict()["epoch"] == 1
    for (xa, ya), (xb, yb) in zip(_epoch(resumed), epoch1):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _jpeg(size: int = 112) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 100, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _bad_file(tmp_path: Path, payload_for_key2: bytes, label_for_key2: float) -> Path:
    """Plain layout: 4 valid images with labels 0..3 except key 2."""
    jpeg = _jpeg()
    rec = tmp_path / "bad.rec"
    with RecordWriter(rec) as w:
        for k in range(4):
            if k == 2:
                w.write(k, IRHeader(0, label_for_key2, k, 0), payload_for_key2)
            else:
                w.write(k, IRHeader(0, float(k), k, 0), jpeg)
    return rec


def test_label_outside_classes_named(tmp_path):
    rec = _bad_file(tmp_path, _jpeg(), 9.0)
    off = RecordReader(rec).offset(2)
    ds = RecordDataset(rec, num_classes=4)
    with pytest.raises(CorruptRecordError, match=rf"bad\.rec: record key 2 at byte offset {off}: label 9 is outside"):
        ds[2]
    ds = RecordDataset(rec, num_classes=4, skip_corrupt=True)
    x, label = ds[2]
    assert label == 3 and ds.skipped == 1  # replaced by the next record, with that record's own label


@pytest.mark.parametrize("label", [float("nan"), 1.5])
def test_non_integer_label_named(tmp_path, label):
    rec = _bad_file(tmp_path, _jpeg(), label)
    with pytest.raises(CorruptRecordError, match=r"record key 2 at byte offset \d+: label .* is not an integer"):
        RecordDataset(rec)[2]


def test_undecodable_payload_named(tmp_path):
    rec = _bad_file(tmp_path, b"\xff\xd8garbage", 2.0)
    off = RecordReader(rec).offset(2)
    with pytest.raises(CorruptRecordError, match=rf"record key 2 at byte offset {off}: undecodable"):
        RecordDataset(rec)[2]
    ds = RecordDataset(rec, skip_corrupt=True)
    assert ds[2][1] == 3 and ds.skipped == 1


def test_wrong_image_size_named(tmp_path):
    rec = _bad_file(tmp_path, _jpeg(64), 2.0)
    with pytest.raises(CorruptRecordError, match="record key 2 .*64x64, expected 112x112"):
        RecordDataset(rec)[2]


def test_synthetic_backend():
    a = build_loader("synthetic", batch_size=8, num_classes=5, rank=1, batches_per_epoch=3)
    batches = list(a)
    assert len(batches) == 3 and a.state_dict() == {"epoch": 1, "batches_consumed": 0}
    x, y = batches[0]
    assert x.shape == (8, 3, 112, 112) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [(8 + i) % 5 for i in range(8)]
    assert float(x.min()) >= -1 and float(x.max()) <= 1


def test_build_loader_from_config(synth):
    from types import SimpleNamespace

    from gbcosface.data import build_loader_from_config
    from gbcosface.distributed import DistContext

    cfg = SimpleNamespace(backend="torch", batch_size=3, rec=str(synth / "train.rec"), idx="", num_classes=IDS,
                          image_size=112, num_workers=0, seed=0, skip_corrupt=False)
    loader = build_loader_from_config(cfg, DistContext(rank=1, world_size=2))
    assert isinstance(loader, TorchLoader) and len(loader) == IDS * PER_ID // 6
    assert loader.sampler.rank == 1 and loader.sampler.world_size == 2


def test_build_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'mxnet'"):
        build_loader("mxnet", batch_size=2)
    with pytest.raises(FileNotFoundError, match="data.rec: .*nope.rec not found"):
        build_loader("torch", batch_size=2, rec=str(tmp_path / "nope.rec"))


# --------------------------------------------------------------------------- DALI (CPU)


def _dali_epoch(synth: Path, tmp_path: Path, rank: int, world: int, batch: int, flip: bool):
    loader = build_loader("dali", batch_size=batch, rank=rank, world_size=world, rec=str(synth / "train.rec"),
                          num_classes=IDS, random_flip=flip, num_threads=1, index_dir=str(tmp_path), seed=1)
    return loader, _epoch(loader)


def test_dali_cpu_matches_torch_loader(synth, tmp_path):
    require("nvidia.dali")
    n = IDS * PER_ID
    loader, batches = _dali_epoch(synth, tmp_path, 0, 1, 8, flip=True)
    assert len(loader) == len(batches) == n // 8
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.dtype == torch.float32 and images.shape == (n, 3, 112, 112) and labels.dtype == torch.int64
    # the whole epoch: each image exactly once, same label multiset as the torch loader
    torch_labels = torch.cat([y for _, y in TorchLoader(RecordDataset(synth / "train.rec"), 8, 0, 1, num_workers=0)])
    assert sorted(labels.tolist()) == sorted(torch_labels.tolist()) == sorted(i // PER_ID for i in range(n))
    # every DALI image is a reference decode (maybe mirrored) of an image of the same label
    reader = RecordReader(synth / "train.rec")
    ref = torch.stack([_pil_tensor(reader[1 + i][1]).float() for i in range(n)])
    flipped = 0
    for x, y in zip(images, labels):
        dist = (ref - x).abs().mean(dim=(1, 2, 3))
        dist_f = (ref.flip(3) - x).abs().mean(dim=(1, 2, 3))
        best, best_f = int(dist.argmin()), int(dist_f.argmin())
        if dist[best] <= dist_f[best_f]:
            assert best // PER_ID == int(y) and float(dist[best]) < 0.01
        else:
            assert best_f // PER_ID == int(y) and float(dist_f[best_f]) < 0.01
            flipped += 1
    assert 0 < flipped < n  # random mirror happened, not always


@pytest.mark.parametrize("world", [2, 5])
def test_dali_cpu_shards_disjoint_equal(synth, tmp_path, world):
    """world=5 trims 24 images to 20: records left out of DALI's index sit between listed ones."""
    require("nvidia.dali")
    n = IDS * PER_ID
    reader = RecordReader(synth / "train.rec")
    ref = torch.stack([_pil_tensor(reader[1 + i][1]).float() for i in range(n)])
    used, lengths = [], []
    for rank in range(world):
        loader, batches = _dali_epoch(synth, tmp_path, rank, world, 2, flip=False)
        lengths.append(len(batches))
        for x, y in batches:
            dist = (ref[None] - x[:, None]).abs().mean(dim=(2, 3, 4))  # [batch, n]
            best = dist.argmin(dim=1)
            assert float(dist.min(dim=1).values.max()) < 0.01  # each image decodes to a real record
            assert (best // PER_ID).tolist() == y.tolist()  # with that record's label
            used += best.tolist()
    assert lengths == [n // world // 2] * world
    assert len(set(used)) == len(used) == sum(lengths) * 2  # disjoint across ranks


def test_dali_rejects_labels_outside_classes(synth, tmp_path):
    require("nvidia.dali")
    loader = build_loader("dali", batch_size=8, rank=0, world_size=1, rec=str(synth / "train.rec"), num_classes=3,
                          num_threads=1, index_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"train\.rec: label\(s\) .* outside the configured classes \[0, 3\)"):
        _epoch(loader)


def _rank_epoch(ctx, rec: str, out_dir: str) -> None:
    from types import SimpleNamespace

    import torch.distributed as dist

    from gbcosface.data import build_loader_from_config

    cfg = SimpleNamespace(backend="torch", batch_size=2, rec=rec, idx="", num_classes=IDS, image_size=112,
                          num_workers=1, seed=4, skip_corrupt=False)
    loader = build_loader_from_config(cfg, ctx)
    # identify each sample by its pixel checksum (flip-invariant: sum over all pixels)
    sums = torch.cat([x.double().sum(dim=(1, 2, 3)) for x, _ in loader])
    count = torch.tensor([len(sums)])
    counts = [torch.zeros_like(count) for _ in range(ctx.world_size)]
    dist.all_gather(counts, count, group=ctx.group)
    gathered = [torch.zeros_like(sums) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, sums, group=ctx.group)
    if ctx.rank == 0:
        torch.save({"counts": [int(c) for c in counts], "sums": torch.stack(gathered)}, f"{out_dir}/result.pt")


@pytest.mark.slow
def test_real_ranks_get_disjoint_equal_shards(synth, tmp_path):
    from tests.dist_utils import run_ranks

    world = 3
    run_ranks(_rank_epoch, world, tmp_path, str(synth / "train.rec"), str(tmp_path))
    res = torch.load(tmp_path / "result.pt")
    steps = IDS * PER_ID // (2 * world)
    assert res["counts"] == [steps * 2] * world
    flat = res["sums"].reshape(-1)
    ds = RecordDataset(synth / "train.rec")
    truth = torch.stack([ds[i][0].double().sum() for i in range(len(ds))])
    # every gathered sample is one dataset image, and no image is used twice across ranks
    match = (flat[:, None] - truth[None]).abs().argmin(dim=1)
    assert torch.allclose(flat, truth[match], atol=1e-6)
    assert len(set(match.tolist())) == len(match) == IDS * PER_ID


@pytest.mark.timeout(120)
def test_workers_survive_sigterm_from_others(synth):
    """SLURM signals every process of a job; the loader's workers must outlive it so that their
    rank can finish its step and checkpoint. The signal comes from another process (`kill`), as
    a scheduler's does."""
    import subprocess

    psutil = require("psutil")
    dataset = RecordDataset(synth / "train.rec", synth / "train.idx")
    loader = TorchLoader(dataset, 2, 0, 1, num_workers=2, seed=0, prefetch_factor=1)
    assert len(loader) > 6
    before = {p.pid for p in psutil.Process().children()}
    batches = iter(loader)
    next(batches), next(batches)  # in-order batches alternate workers: both have started up
    workers = [p for p in psutil.Process().children() if p.pid not in before]
    assert len(workers) == 2
    subprocess.run(["kill", "-TERM", *(str(w.pid) for w in workers)], check=True)
    psutil.wait_procs(workers, timeout=1.0)  # a worker that obeys this SIGTERM is gone by now
    rest = list(batches)
    assert len(rest) == len(loader) - 2


EXIT_WITH_LIVE_ITERATOR = """
import sys
from gbcosface.data.torch_loader import RecordDataset, TorchLoader
loader = TorchLoader(RecordDataset(sys.argv[1]), 2, 0, 1, num_workers=2, prefetch_factor=1)
batches = iter(loader)
next(batches)
print("exiting with a live iterator", flush=True)
"""


def test_exit_with_a_live_iterator_does_not_hang(synth):
    """At interpreter exit multiprocessing terminates daemonic workers with SIGTERM and joins them:
    the parent's SIGTERM must still end a worker, or the exit waits forever."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", EXIT_WITH_LIVE_ITERATOR, str(synth / "train.rec")],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "exiting with a live iterator" in out.stdout
