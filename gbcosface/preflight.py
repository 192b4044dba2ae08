"""Checks before any rank does work: config relations, files, output folder, labels, checkpoint.

Every rank runs :func:`validate` and looks at the files it will read (on a multi-node job a
data file can be missing on one node only); rank 0 alone probes the output folder, its free
space, the label range of the training set and the checkpoint to resume. All ranks then
exchange their findings in one collective, so every rank raises the same
:class:`PreflightError` (each problem tagged with the ranks that saw it when not all did) and
none is left waiting in a collective the others never reach. The same exchange hands every
rank rank 0's choice of checkpoint, so all ranks resume from the same folder.

The label check must be quick for tens of millions of images: an InsightFace .rec states its
identity count in the header record (key 0), beside a ``property`` file with the class count,
and keeps images sorted by label, so the first and last image records bound every label. A
plain im2rec file has no such summary; its image headers are read in vectorised chunks
(36 bytes per record, no image decoding). The loader still refuses any out-of-range label it
meets, naming the file, key and byte offset.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch.distributed as dist

from gbcosface import checkpoint as ckpt
from gbcosface.config import Config, ConfigError, Problem, validate
from gbcosface.data.recordio import MAGIC, IR_SIZE, RecordIOError, RecordReader, detect_layout, first_label
from gbcosface.distributed import DistContext

GB = 1e9
_SCAN_CHUNK = 1 << 20  # records per vectorised read of image headers
_MAX_ONE_BY_ONE = 10_000  # odd headers read one by one; beyond that the loader's own check remains
# magic, lrec, then MXNet's IRHeader (flag, label, id, id2), then label[0] when flag > 0
_HEAD = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"),
                  ("id2", "<u8"), ("label0", "<f4")])


class PreflightError(ConfigError):
    """Problems found before training started; the same message on every rank."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        ValueError.__init__(self, f"{count} problem{'s' if count != 1 else ''} found before training started:\n{lines}")


# ------------------------------------------------------------------------------ single checks


def output_problems(cfg: Config) -> list[Problem]:
    """The checkpoint folder can be created and written, and has ``checkpoint.min_free_gb`` free."""
    folder = cfg.checkpoint_dir
    probe = folder / f".write-test-{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"gbcosface")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return [Problem("train.output", f"cannot write checkpoints to {folder}: {exc.strerror or exc}")]
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    need = cfg.checkpoint.min_free_gb
    if need > 0:
        free = shutil.disk_usage(folder).free / GB
        if free < need:
            return [Problem("checkpoint.min_free_gb", f"{folder} has {free:.2f} GB free, below the required "
                            f"{need:g} GB; free some space, point train.output elsewhere, or lower the limit")]
    return []


def data_file_problems(cfg: Config) -> list[Problem]:
    """The training files that exist can also be opened by this rank (permissions, broken mounts)."""
    d = cfg.data
    if d.backend == "synthetic":
        return []
    problems = []
    for key in ("rec", "idx"):
        path = getattr(d, key)
        if not path or not os.path.exists(path):  # validate() reports missing files
            continue
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            problems.append(Problem(f"data.{key}", f"cannot read {path}: {exc.strerror or exc}"))
    return problems


def scan_labels(reader: RecordReader, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the image records ``keys`` read from their headers only, in vectorised chunks.

    Returns ``(labels float64, ok bool)``; where ``ok`` is False the header could not be read
    this way (a split record, a header past the end of the file, a wrong magic) and the label is
    meaningless: the caller reads those records one by one.
    """
    mm = np.memmap(reader.path_rec, dtype=np.uint8, mode="r") if reader.file_size else np.zeros(0, np.uint8)
    labels = np.empty(len(keys), dtype=np.float64)
    ok = np.zeros(len(keys), dtype=bool)
    span = np.arange(_HEAD.itemsize, dtype=np.int64)
    for lo in range(0, len(keys), _SCAN_CHUNK):
        chunk = keys[lo:lo + _SCAN_CHUNK]
        offsets = reader.offsets_for(chunk)
        inside = offsets + _HEAD.itemsize <= reader.file_size
        raw = np.zeros((len(chunk), _HEAD.itemsize), dtype=np.uint8)
        raw[inside] = mm[offsets[inside, None] + span]
        head = raw.view(_HEAD).reshape(-1)
        length = (head["lrec"] & ((1 << 29) - 1)).astype(np.int64)
        whole = (head["magic"] == MAGIC) & (head["lrec"] >> 29 == 0) & (length >= IR_SIZE + 4 * (head["flag"] > 0))
        ok[lo:lo + len(chunk)] = inside & whole
        labels[lo:lo + len(chunk)] = np.where(head["flag"] > 0, head["label0"], head["label"])
    return labels, ok


def label_problems(rec: str, idx: str, num_classes: int, full_scan: bool | None = None) -> list[Problem]:
    """Labels outside ``[0, num_classes)``, found before training (see the module docstring)."""
    try:
        reader = RecordReader(rec, idx or None)
        layout = detect_layout(reader)
    except (OSError, RecordIOError) as exc:
        return [Problem("data.rec", str(exc))]
    problems: list[Problem] = []
    where = f"data.num_classes is {num_classes}"
    with reader:
        if layout.kind == "insightface":
            header, _ = reader[0]
            identities = int(header.label[1]) - int(header.label[0])
            if identities > num_classes:
                problems.append(Problem("data.num_classes", f"{reader.path_rec}: the header record (key 0 at byte "
                                        f"offset {reader.offset(0)}) lists {identities} identities but {where}"))
            prop = Path(reader.path_rec).parent / "property"
            if prop.is_file():
                try:
                    classes = int(prop.read_text().split(",")[0])
                except ValueError:
                    problems.append(Problem("data.rec", f"{prop}: expected 'classes,height,width'"))
                else:
                    if classes > num_classes:
                        problems.append(Problem("data.num_classes", f"{prop} says {classes} classes but {where}"))
        scan_all = layout.kind != "insightface" if full_scan is None else full_scan
        keys = layout.image_keys if scan_all or len(layout.image_keys) < 2 else layout.image_keys[[0, -1]]
        labels, ok = scan_labels(reader, keys)
        bad = ok & (~np.isfinite(labels) | (labels != np.floor(labels)) | (labels < 0) | (labels >= num_classes))
        found = [(int(k), float(v)) for k, v in zip(keys[bad], labels[bad])]
        for key in keys[~ok][:_MAX_ONE_BY_ONE].tolist():  # split records: read them properly
            try:
                value = first_label(reader[key][0])
            except RecordIOError:
                continue  # a corrupt record: the loader stops at it or skips it (data.skip_corrupt)
            if not (math.isfinite(value) and value == int(value) and 0 <= value < num_classes):
                found.append((key, value))
        for key, value in found[:3]:
            problems.append(Problem("data.num_classes", f"{reader.path_rec}: record key {key} at byte offset "
                                    f"{reader.offset(key)} has label {value:g}, outside [0, {num_classes}) "
                                    f"({where})"))
        if len(found) > 3:
            problems.append(Problem("data.num_classes", f"{reader.path_rec}: {len(found) - 3} more records with "
                                    f"labels outside [0, {num_classes})"))
    return problems


def checkpoint_problems(cfg: Config) -> tuple[list[Problem], Path | None]:
    """The checkpoint ``train.resume`` selects, and why it cannot be resumed by this config."""
    try:
        path = ckpt.resume_path(cfg.train.resume, cfg.checkpoint_dir)
        if path is None:
            return [], None
        ckpt.check_compatible(path, num_classes=cfg.data.num_classes, embedding_size=cfg.backbone.embedding_size)
    except ckpt.CheckpointError as exc:
        return [Problem("train.resume", str(exc))], None
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [Problem("train.resume", f"{path / 'config.json'} is unreadable: {exc}")], None
    problems = []
    for section, key in (("backbone", "name"), ("loss", "name")):
        theirs, ours = saved.get(section, {}).get(key), getattr(getattr(cfg, section), key)
        if theirs != ours:
            problems.append(Problem("train.resume", f"{path / 'config.json'}: {section}.{key} is {theirs!r} in the "
                                    f"checkpoint but {ours!r} in the config (start fresh with train.resume=\"\" "
                                    "or point train.output elsewhere)"))
    return problems, (None if problems else path)


# ------------------------------------------------------------------------------ all together


def _this_rank(cfg: Config, ctx: DistContext) -> tuple[list[Problem], Path | None]:
    try:
        validate(cfg, ctx.world_size)
        problems: list[Problem] = []
    except ConfigError as exc:
        problems = list(exc.problems)
    problems += data_file_problems(cfg)
    resume = None
    if ctx.is_main and not problems:
        problems += output_problems(cfg)
        if cfg.data.backend != "synthetic":
            problems += label_problems(cfg.data.rec, cfg.data.idx, cfg.data.num_classes)
        found, resume = checkpoint_problems(cfg)
        problems += found
    return problems, resume


def _merge(per_rank: list[list[Problem]], world_size: int) -> list[Problem]:
    """One list, in first-seen order; a problem not seen by every rank names the ranks that saw it."""
    seen: dict[Problem, list[int]] = {}
    for rank, problems in enumerate(per_rank):
        for p in problems:
            seen.setdefault(p, []).append(rank)
    merged = []
    for p, ranks in seen.items():
        if world_size > 1 and len(ranks) < world_size and ranks != [0]:
            label = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
            p = Problem(p.key, f"{p.message} (on {label})", p.source)
        merged.append(p)
    return merged


def run_preflight(cfg: Config, ctx: DistContext) -> Path | None:
    """Every check above; collective. Returns the checkpoint to resume from (rank 0's choice),
    or raises the same :class:`PreflightError` on every rank."""
    try:
        problems, resume = _this_rank(cfg, ctx)
    except Exception as exc:  # a bug here must not leave the other ranks waiting below
        problems, resume = [Problem("", f"pre-flight check failed: {type(exc).__name__}: {exc}")], None
    reports: list = [(problems, str(resume) if resume else None)]
    if ctx.is_distributed:
        reports = [None] * ctx.world_size
        dist.all_gather_object(reports, (problems, str(resume) if resume else None), group=ctx.group)
    merged = _merge([r[0] for r in reports], ctx.world_size)
    if merged:
        raise PreflightError(merged)
    chosen = reports[0][1]
    return Path(chosen) if chosen else None

