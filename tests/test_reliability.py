"""Reliability, in-process and on spawned gloo ranks: non-finite losses, corrupt records, labels
outside the classes, pre-flight checks, a crash while a checkpoint is written, a stuck rank.

The end-to-end faults (SIGKILL under torchrun, SIGTERM, a rank that never joins) are in
``test_reliability_e2e.py``. docs/RELIABILITY.md maps every fault to its test.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gbcosface import checkpoint as ckpt
from gbcosface.config import config_from_dict
from gbcosface.data.recordio import IRHeader, RecordReader, RecordWriter
from gbcosface.distributed import DistContext
from tests.dist_utils import run_ranks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """24 identities x 8 images, InsightFace layout with a ``property`` file (192 images)."""
    from gbcosface.data.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    return generate(out, identities=24, images_per_identity=8, val_pairs=0, seed=5, workers=1, verbose=False)


def make_config(dataset: dict, output: Path, **sections) -> dict:
    """A tiny CPU run: 192 images, batch 8 per rank, tiny backbone; 1 epoch = 24 // world steps."""
    cfg = {
        "data": {"backend": "torch", "rec": dataset["rec"], "idx": dataset["idx"], "num_classes": dataset["classes"],
                 "num_images": dataset["images"], "batch_size": 8, "num_workers": 0},
        "backbone": {"name": "tiny", "embedding_size": 32},
        "optim": {"lr": 0.05, "warmup_epochs": 0.0},
        "train": {"epochs": 1, "output": str(output), "resume": "", "log_every": 1, "deterministic": False},
        "checkpoint": {"every": 0, "keep": 5, "min_free_gb": 0.0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def trainer_for(cfg: dict):
    from gbcosface.trainer import Trainer

    return Trainer(config_from_dict(cfg), DistContext())


class PoisonedLoader:
    """Wraps a loader and turns the images of chosen batches (counted from the run's start on
    this rank) into NaN: a bad batch without any hook in the trainer."""

    def __init__(self, inner, bad: set[int]) -> None:
        self.inner, self.bad, self.seen = inner, set(bad), 0

    def __len__(self) -> int:
        return len(self.inner)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def __iter__(self):
        for images, labels in self.inner:
            if self.seen in self.bad:
                images = torch.full_like(images, float("nan"))
            self.seen += 1
            yield images, labels


# ------------------------------------------------------------------------------ non-finite


def test_nonfinite_batches_are_skipped_counted_and_logged(synthetic, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = trainer_for(make_config(synthetic, tmp_path / "run", train={"log_every": 4}))
    trainer.loader = PoisonedLoader(trainer.loader, {3, 9})
    boundaries = []
    step_fn = trainer.train_step

    def record(batches):
        before = trainer.head.margin_loss.boundary.clone()
        stats = step_fn(batches)
        if stats is None:  # a skipped step leaves the global boundary where it was
            boundaries.append((before, trainer.head.margin_loss.boundary.clone()))
        return stats

    trainer.train_step = record
    result = trainer.fit()
    assert trainer.nonfinite_total == 2 and len(boundaries) == 2
    assert result["status"] == "finished" and result["step"] == 24 - 2  # two batches were dropped
    for before, after in boundaries:
        assert torch.equal(before, after) or (before.isnan().all() and after.isnan().all())
    assert all(torch.isfinite(p).all() for p in trainer.engine.backbone.parameters())
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    totals = [e.value for e in acc.Scalars("train/nonfinite_total")]
    assert max(totals) == 2
    saved = torch.load(ckpt.find_latest(tmp_path / "run" / "ckpt") / "train_state.pt", weights_only=True)
    assert saved["nonfinite_total"] == 2


def test_nonfinite_in_a_row_stops_with_a_checkpoint_naming_the_step(synthetic, tmp_path):
    from gbcosface.trainer import NonFiniteLossError

    trainer = trainer_for(make_config(synthetic, tmp_path / "run", train={"max_nonfinite": 3}))
    trainer.loader = PoisonedLoader(trainer.loader, {4, 5, 6})
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "3 non-finite losses in a row up to step 5" in message
    latest = ckpt.find_latest(tmp_path / "run" / "ckpt")
    assert latest is not None and latest.name == "step-00000004" and str(latest) in message
    assert ckpt.checkpoint_problem(latest) is None


def _nan_on_rank_one(ctx, cfg: dict, out: str) -> None:
    from gbcosface.trainer import Trainer

    trainer = Trainer(config_from_dict(cfg), ctx)
    if ctx.rank == 1:
        trainer.loader = PoisonedLoader(trainer.loader, {2})
    result = trainer.fit()
    params = torch.cat([p.detach().flatten() for p in trainer.engine.backbone.parameters()])
    torch.save({"step": result["step"], "nonfinite": trainer.nonfinite_total, "params": params},
               f"{out}.{ctx.rank}")


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_by_every_rank(synthetic, tmp_path):
    cfg = make_config(synthetic, tmp_path / "run")
    run_ranks(_nan_on_rank_one, 2, tmp_path, cfg, str(tmp_path / "res"))
    r0, r1 = (torch.load(tmp_path / f"res.{r}", weights_only=True) for r in (0, 1))
    assert r0["nonfinite"] == r1["nonfinite"] == 1
    assert r0["step"] == r1["step"] == 12 - 1
    assert torch.equal(r0["params"], r1["params"]) and torch.isfinite(r0["params"]).all()


# ------------------------------------------------------------------------------ bad data


def corrupt_copy(data: dict, folder: Path, key: int) -> dict:
    """A copy of the data set whose record ``key`` has its JPEG bytes zeroed."""
    folder.mkdir(parents=True, exist_ok=True)
    rec, idx = folder / "train.rec", folder / "train.idx"
    shutil.copy(data["rec"], rec)
    shutil.copy(data["idx"], idx)
    shutil.copy(Path(data["rec"]).parent / "property", folder / "property")
    offset = RecordReader(rec, idx).offset(key)
    with open(rec, "r+b") as f:
        f.seek(offset + 8 + 24)  # record header, IRHeader, then the JPEG
        f.write(b"\0" * 64)
    return {**data, "rec": str(rec), "idx": str(idx), "offset": offset}


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_record_fails_naming_file_key_and_offset(synthetic, tmp_path, workers):
    from gbcosface.trainer import DataError

    bad = corrupt_copy(synthetic, tmp_path / "data", key=7)
    trainer = trainer_for(make_config(bad, tmp_path / "run", data={"num_workers": workers}))
    with pytest.raises(DataError) as info:
        trainer.fit()
    message = str(info.value)
    assert bad["rec"] in message and "record key 7" in message and f"byte offset {bad['offset']}" in message
    assert "data.skip_corrupt" in message and "Traceback" not in message


def test_corrupt_record_is_skipped_and_counted_when_allowed(synthetic, tmp_path, caplog):
    bad = corrupt_copy(synthetic, tmp_path / "data", key=7)
    trainer = trainer_for(make_config(bad, tmp_path / "run", data={"skip_corrupt": True}))
    with caplog.at_level(logging.WARNING):
        result = trainer.fit()
    assert result["status"] == "finished" and result["step"] == 24
    assert trainer.loader.dataset.skipped == 1
    assert any("skipping corrupt record" in r.getMessage() and "record key 7" in r.getMessage()
               for r in caplog.records)


def test_labels_beyond_the_classes_are_refused_before_training(synthetic, tmp_path):
    from gbcosface.preflight import PreflightError

    with pytest.raises(PreflightError) as info:
        trainer_for(make_config(synthetic, tmp_path / "run", data={"num_classes": 20}))
    message = str(info.value)
    assert "found before training started" in message
    assert "header record (key 0" in message and "lists 24 identities but data.num_classes is 20" in message
    assert "property says 24 classes" in message
    assert "record key 192" in message and "has label 23" in message  # the last image, read from its header
    assert not (tmp_path / "run" / "tensorboard").exists()  # refused before anything was built


def plain_rec(folder: Path, labels: list[float]) -> tuple[str, str]:
    """An im2rec-style file (every record an image, no header record) with the given labels."""
    from gbcosface.data.images import encode_jpeg

    folder.mkdir(parents=True, exist_ok=True)
    rec, idx = str(folder / "plain.rec"), str(folder / "plain.idx")
    img = encode_jpeg(np.full((112, 112, 3), 128, np.uint8), 90)
    with RecordWriter(rec, idx) as w:
        for key, label in enumerate(labels, start=1):
            w.write(key, IRHeader(0, label, key, 0), img)
    return rec, idx


def test_plain_file_labels_are_scanned_from_headers(tmp_path):
    from gbcosface.preflight import label_problems

    labels = [float(i % 10) for i in range(40)]
    labels[17], labels[30] = 12.0, 2.5
    rec, idx = plain_rec(tmp_path, labels)
    problems = label_problems(rec, idx, num_classes=10)
    offset = RecordReader(rec, idx).offset(18)
    text = "\n".join(str(p) for p in problems)
    assert f"record key 18 at byte offset {offset} has label 12" in text
    assert "record key 31" in text and "label 2.5" in text
    only_fraction = label_problems(rec, idx, num_classes=13)
    assert len(only_fraction) == 1 and "record key 31" in str(only_fraction[0])


def test_label_scan_reads_split_records_and_leaves_corrupt_ones_to_the_loader(tmp_path):
    """A record whose data holds the RecordIO magic is split in parts: its header is read the
    slow way. A record with a broken magic is not a label problem: the loader stops at it (or
    skips it with data.skip_corrupt), naming it."""
    from gbcosface.data.recordio import MAGIC
    from gbcosface.preflight import label_problems

    rec, idx = str(tmp_path / "split.rec"), str(tmp_path / "split.idx")
    magic = np.uint32(MAGIC).tobytes()
    with RecordWriter(rec, idx) as w:
        for key in range(1, 9):
            label = 12.0 if key == 3 else float(key)
            w.write(key, IRHeader(0, label, key, 0), magic + b"jpeg" * 8 if key == 3 else b"\xff\xd8" * 8)
    reader = RecordReader(rec, idx)
    with open(rec, "r+b") as f:  # break record 6's magic
        f.seek(reader.offset(6))
        f.write(b"\0\0\0\0")
    problems = label_problems(rec, idx, num_classes=10)
    assert len(problems) == 1 and f"record key 3 at byte offset {reader.offset(3)} has label 12" in str(problems[0])


def test_insightface_full_scan_finds_a_label_hidden_in_the_middle(synthetic, tmp_path):
    """The header shortcut trusts the label order; the full scan (plain files) does not."""
    from gbcosface.preflight import label_problems

    folder = tmp_path / "data"
    folder.mkdir()
    rec, idx = folder / "train.rec", folder / "train.idx"
    shutil.copy(synthetic["rec"], rec)
    shutil.copy(synthetic["idx"], idx)
    offset = RecordReader(rec, idx).offset(50)
    with open(rec, "r+b") as f:  # IRHeader label of key 50 -> 99.0
        f.seek(offset + 8 + 4)
        f.write(np.float32(99.0).tobytes())
    assert label_problems(str(rec), str(idx), 24) == []
    found = label_problems(str(rec), str(idx), 24, full_scan=True)
    assert len(found) == 1 and f"record key 50 at byte offset {offset} has label 99" in str(found[0])


# ------------------------------------------------------------------------------ pre-flight


def preflight_message(cfg: dict) -> str:
    from gbcosface.preflight import PreflightError

    with pytest.raises(PreflightError) as info:
        trainer_for(cfg)
    return str(info.value)


def test_preflight_missing_data_file(synthetic, tmp_path):
    message = preflight_message(make_config(synthetic, tmp_path / "run", data={"rec": str(tmp_path / "gone.rec")}))
    assert "data.rec" in message and "gone.rec does not exist" in message
    assert message.count("\n  - ") == 1


def test_preflight_unwritable_output(synthetic, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    message = preflight_message(make_config(synthetic, blocker / "run"))
    assert "train.output" in message and str(blocker / "run") in message


def test_preflight_probe_catches_what_permission_bits_miss(synthetic, tmp_path):
    """/proc passes os.access for root but refuses new folders: only writing tells."""
    from gbcosface.preflight import output_problems

    cfg = config_from_dict(make_config(synthetic, Path("/proc/gbcosface-no-such-run")))
    problems = output_problems(cfg)
    assert len(problems) == 1 and problems[0].key == "train.output"
    assert "cannot write checkpoints to /proc/gbcosface-no-such-run/ckpt" in str(problems[0])


def test_preflight_nearly_full_disk(synthetic, tmp_path):
    message = preflight_message(make_config(synthetic, tmp_path / "run", checkpoint={"min_free_gb": 1e9}))
    assert "checkpoint.min_free_gb" in message and "GB free, below the required 1e+09 GB" in message


@pytest.fixture(scope="module")
def saved_run(synthetic, tmp_path_factory) -> Path:
    """A finished 1-epoch run with its checkpoint, for incompatible-resume checks."""
    out = tmp_path_factory.mktemp("saved") / "run"
    trainer_for(make_config(synthetic, out)).fit()
    return out


@pytest.mark.parametrize("change, expected", [
    ({"data": {"num_classes": 30}}, "num_classes is 24 in the checkpoint but 30 in the config"),
    ({"backbone": {"embedding_size": 64}}, "embedding_size is 32 in the checkpoint but 64 in the config"),
    ({"loss": {"name": "cosface"}}, "loss.name is 'gbcosface' in the checkpoint but 'cosface' in the config"),
])
def test_preflight_incompatible_checkpoint(synthetic, saved_run, change, expected):
    cfg = make_config(synthetic, saved_run, train={"resume": "auto"}, **change)
    message = preflight_message(cfg)
    assert "train.resume" in message and expected in message and str(saved_run / "ckpt") in message


def _preflight_on_ranks(ctx, cfg: dict, out: str) -> None:
    from gbcosface.preflight import PreflightError
    from gbcosface.trainer import Trainer

    try:
        Trainer(config_from_dict(cfg), ctx)
        message = "no error"
    except PreflightError as exc:
        message = str(exc)
    Path(f"{out}.{ctx.rank}").write_text(message)


def test_preflight_verdict_is_the_same_on_every_rank(synthetic, tmp_path):
    cfg = make_config(synthetic, tmp_path / "run", checkpoint={"min_free_gb": 1e9},
                      data={"idx": str(tmp_path / "gone.idx")})
    run_ranks(_preflight_on_ranks, 2, tmp_path, cfg, str(tmp_path / "msg"))
    m0, m1 = (Path(f"{tmp_path / 'msg'}.{r}").read_text() for r in (0, 1))
    assert m0 == m1 and "gone.idx does not exist" in m0


# ------------------------------------------------------------------------------ crash during save

_CRASHING_SAVE = """
import os, sys, time
from pathlib import Path
import gbcosface.checkpoint as ckpt
from gbcosface.config import load_config
from gbcosface.distributed import DistContext
from gbcosface.trainer import Trainer

cfg_path, marker, where = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
saves = []

def stall(reason):
    marker.write_text(reason)
    time.sleep(600)  # the test kills us here

real_save, real_rename = ckpt._save, os.rename

def slow_save(obj, path):
    if path.name.startswith("head-"):  # the first file of every save
        saves.append(path)
    if len(saves) == 2 and where == "files" and path.name == "backbone.pt":
        with open(path, "wb") as f:  # half a file on disk, as a crash mid-write leaves it
            f.write(b"PK" + b"x" * 100)
        stall("files")
    real_save(obj, path)

def slow_rename(src, dst):
    if len(saves) == 2 and where == "rename" and ".tmp-" in str(src):
        stall("rename")
    real_rename(src, dst)

ckpt._save = slow_save
ckpt.os.rename = slow_rename
Trainer(load_config(cfg_path), DistContext()).fit()
"""


def write_toml(cfg: dict, path: Path) -> Path:
    import json

    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("where", ["files", "rename"])
def test_sigkill_while_saving_leaves_the_previous_checkpoint(synthetic, tmp_path, where):
    """SIGKILL in the middle of the second save (files half written, or complete but not yet
    renamed): resume uses the first checkpoint and reads nothing from the unfinished folder."""
    out = tmp_path / "run"
    cfg = make_config(synthetic, out, checkpoint={"every": 5})
    marker = tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_SAVE, str(write_toml(cfg, tmp_path / "c.toml")),
                             str(marker), where], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no stall"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    root = out / "ckpt"
    leftovers = [p.name for p in root.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].startswith("step-00000010.tmp-")
    assert ckpt.find_latest(root).name == "step-00000005"

    loaded: list[Path] = []
    real_load = ckpt._load

    def spy(path, *args, **kwargs):
        loaded.append(Path(path))
        return real_load(path, *args, **kwargs)

    ckpt._load = spy
    try:
        cfg["train"]["resume"] = "auto"
        trainer = trainer_for(cfg)
    finally:
        ckpt._load = real_load
    assert trainer.resumed_from.name == "step-00000005" and trainer.step == 5
    assert loaded and all(p.parent.name == "step-00000005" for p in loaded)
    trainer.fit()  # the next save prunes the leftover
    assert not any(".tmp-" in p.name for p in root.iterdir())


def test_leftovers_and_truncated_files_are_never_read(synthetic, tmp_path):
    """Newer-looking folders that are incomplete (no manifest, a truncated file, a .tmp name,
    a manifest not marked complete) are skipped; only the complete one is opened."""
    out = tmp_path / "run"
    cfg = make_config(synthetic, out, checkpoint={"every": 4})
    trainer_for({**cfg, "train": {**cfg["train"], "epochs": 1}}).fit()
    root = out / "ckpt"
    newest = ckpt.find_latest(root)
    assert newest.name == "step-00000024"
    base = root / "step-00000020"

    def fake(name: str) -> Path:
        dst = root / name
        shutil.copytree(base, dst)
        return dst

    truncated = fake("step-00000030")
    with open(truncated / "backbone.pt", "r+b") as f:
        f.truncate(100)
    (fake("step-00000031") / "manifest.json").unlink()
    fake("step-00000032.tmp-0badc0de")
    half = fake("step-00000033")
    manifest = (half / "manifest.json").read_text()
    (half / "manifest.json").write_text(manifest.replace('"complete": true', '"complete": false'))
    garbled = fake("step-00000034")
    (garbled / "manifest.json").write_text('{"format": 1, "st')

    loaded: list[Path] = []
    real_load = ckpt._load
    ckpt._load = lambda path, *a, **k: (loaded.append(Path(path)), real_load(path, *a, **k))[1]
    try:
        trainer = trainer_for({**cfg, "train": {**cfg["train"], "resume": "auto", "epochs": 2}})
    finally:
        ckpt._load = real_load
    assert trainer.resumed_from == newest and trainer.step == 24
    assert {p.parent for p in loaded} == {newest}


# ------------------------------------------------------------------------------ stuck rank


def _stuck_rank(rank: int, cfg: dict, init_file: str, out: str) -> None:
    """Rank 1 builds its trainer (the collectives of start-up complete) and then never steps."""
    from gbcosface.distributed import init_from_file
    from gbcosface.trainer import DistributedJobError, Trainer

    torch.set_num_threads(1)
    ctx = init_from_file(rank, 2, init_file, timeout_s=cfg["train"]["timeout_s"])
    trainer = Trainer(config_from_dict(cfg), ctx)
    if rank == 1:
        Path(f"{out}.ready").write_text("stuck")
        time.sleep(3600)
    started = time.monotonic()
    try:
        trainer.fit()
        message = "no error"
    except DistributedJobError as exc:
        message = str(exc)
    Path(f"{out}.0").write_text(f"{time.monotonic() - started:.1f}\n{message}")
    os._exit(0)  # no orderly teardown: the peer is stuck


@pytest.mark.slow
def test_a_collective_that_never_completes_ends_with_a_clear_error(synthetic, tmp_path):
    cfg = make_config(synthetic, tmp_path / "run", train={"timeout_s": 4.0})
    init_file, out = str(tmp_path / "rdzv"), str(tmp_path / "res")
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_stuck_rank, args=(r, cfg, init_file, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        procs[0].join(timeout=180)  # liveness bound: start-up + well over 3x the timeout
        assert procs[0].exitcode == 0, "rank 0 did not end"
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join()
    elapsed, message = Path(f"{out}.0").read_text().split("\n", 1)
    assert "step 1: a collective did not complete within train.timeout_s = 4 s" in message
    assert "other ranks' logs" in message  # gloo's own words vary: "Timed out ...", "Application timeout ..."
