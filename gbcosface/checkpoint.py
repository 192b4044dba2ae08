"""Checkpoints you can read: step folders with a manifest, written atomically, re-shardable.

Layout of one checkpoint (``<output>/ckpt/step-00012000/``)::

    manifest.json              world size, classes, class range per shard, step, config hash,
                               every file with its size; written last, ends with "complete": true
    config.json                the run's configuration (loadable with ``load_config``)
    backbone.pt                backbone state_dict                       (rank 0)
    optim-backbone.pt          backbone optimizer state_dict             (rank 0, optional)
    train_state.pt             step, epoch, boundary, LR schedule, scaler, data position (rank 0)
    head-rank00003.pt          one per head shard: rows, per-row optimizer state   (every rank)
    rank_state-rank00003.pt    RNG states and other per-rank state                 (every rank)

Every rank writes into ``step-00012000.tmp-<nonce>/``; once all files are on disk rank 0 writes
the manifest, fsyncs and renames the folder to its final name. A crash at any moment leaves
either a ``.tmp-`` folder or a folder without a complete manifest, and :func:`find_latest`
ignores both, so resume never reads a half-written checkpoint. The folder must be on a
filesystem every rank sees (one node, or NFS/Lustre/GPFS across nodes).

Head rows are stored with their class range, so :func:`reshard_rows` can rebuild any range from
the shards that overlap it: a run saved on 4 ranks resumes on 3 or on 1.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gbcosface.config import Config
from gbcosface.distributed import DistContext

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_STALE_DIR = re.compile(r"^step-\d{8,}\.(tmp|old)-[0-9a-f]+$")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, unreadable or does not fit the run."""


@dataclass
class HeadShard:
    """One rank's head rows ``[class_start, class_start + num_local)`` and their optimizer state.

    ``optimizer`` holds per-row tensors (each ``[num_local, ...]``, e.g. SGD momentum) that move
    with their rows when re-sharding; ``optimizer_rest`` holds everything else of the optimizer
    state (param groups, step counts), which is the same on every shard.
    """

    class_start: int
    num_local: int
    weight: torch.Tensor
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_rest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = {"weight": self.weight, **self.optimizer}
        bad = {k: tuple(v.shape) for k, v in rows.items() if v.dim() < 1 or v.shape[0] != self.num_local}
        if bad:
            raise ValueError(f"HeadShard: tensors without {self.num_local} rows: {bad}")


@dataclass
class LoadedCheckpoint:
    """Everything one rank needs to resume.

    ``rank_state`` is this rank's own saved state (RNG) when the world size is unchanged, and
    ``None`` otherwise: after a re-shard, per-rank streams have no counterpart to continue.
    """

    path: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    backbone: dict[str, Any] | None
    backbone_optim: dict[str, Any] | None
    head: HeadShard
    train_state: dict[str, Any]
    rank_state: dict[str, Any] | None


def step_dir_name(step: int) -> str:
    """``step-00012000``: zero-padded so names sort like steps."""
    return f"step-{step:08d}"


def head_file(rank: int) -> str:
    return f"head-rank{rank:05d}.pt"


def rank_state_file(rank: int) -> str:
    return f"rank_state-rank{rank:05d}.pt"


# --------------------------------------------------------------------------------------- RNG


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU and (on a CUDA device) CUDA generator states, as plain tensors
    and Python values so they load with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------- optimizer rows <-> state


def split_optimizer_rows(state_dict: dict[str, Any], num_local: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a head optimizer's ``state_dict()`` into per-row tensors and the rest.

    A state tensor whose first dimension is ``num_local`` belongs to rows (momentum, Adam's
    moments); keys are ``"<param index>/<name>"``. Scalars such as Adam's ``step`` stay in the rest.
    """
    rows: dict[str, torch.Tensor] = {}
    rest_state: dict[Any, dict[str, Any]] = {}
    for pid, pstate in state_dict.get("state", {}).items():
        rest_state[pid] = {}
        for name, value in pstate.items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == num_local:
                rows[f"{pid}/{name}"] = value
            else:
                rest_state[pid][name] = value
    rest = {k: v for k, v in state_dict.items() if k != "state"}
    rest["state"] = rest_state
    return rows, rest


def join_optimizer_rows(rows: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_optimizer_rows`: a ``state_dict`` to ``load_state_dict`` into."""
    state: dict[Any, dict[str, Any]] = {pid: dict(pstate) for pid, pstate in rest.get("state", {}).items()}
    for key, value in rows.items():
        pid_text, name = key.split("/", 1)
        pid: Any = int(pid_text) if pid_text.lstrip("-").isdigit() else pid_text
        state.setdefault(pid, {})[name] = value
    out = {k: v for k, v in rest.items() if k != "state"}
    out["state"] = state
    return out


# ----------------------------------------------------------------------------------- saving


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj: Any, path: Path) -> None:
    """torch.save, then fsync, so the rename that publishes the folder never outruns the data."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _gather(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (a barrier that also carries errors)."""
    if ctx.group is None or ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.group)
    return out


def _broadcast(ctx: DistContext, obj: Any) -> Any:
    if ctx.group is None or ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=ctx.group, device=ctx.device)
    return box[0]


def _raise_if_failed(errors: list[str | None], what: str) -> None:
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if failed:
        raise CheckpointError(f"{what} failed: " + "; ".join(failed))


def save_checkpoint(
    root: str | os.PathLike,
    *,
    ctx: DistContext,
    step: int,
    epoch: int,
    config: Config,
    head: HeadShard,
    train_state: dict[str, Any],
    backbone: dict[str, Any] | None = None,
    backbone_optim: dict[str, Any] | None = None,
    rank_state: dict[str, Any] | None = None,
    keep: int = 0,
    extra_writer: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``<root>/step-XXXXXXXX`` atomically; collective: every rank calls it.

    Each rank passes its own ``head`` shard and ``rank_state`` (its RNG states are added as
    ``rank_state["rng"]``); rank 0's ``backbone``, ``backbone_optim``, ``train_state`` and
    ``config`` are written (other ranks may pass the same or nothing). ``extra_writer(folder)``
    runs on every rank before publishing, for engines that save their own files (DeepSpeed).
    ``keep > 0`` deletes all but the newest ``keep`` complete checkpoints. A failure on any rank
    raises the same :class:`CheckpointError` on every rank and publishes nothing.
    """
    root = Path(root)
    embedding_size = config.backbone.embedding_size
    name = step_dir_name(step)
    tmp_name: str | None = None
    error: str | None = None
    if ctx.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp_name = f"{name}.tmp-{secrets.token_hex(4)}"
            (root / tmp_name).mkdir()
        except OSError as exc:
            error = f"cannot create a folder under {root}: {exc}"
    tmp_name, error = _broadcast(ctx, (tmp_name, error))
    if error:
        raise CheckpointError(error)
    tmp = root / tmp_name

    error = None
    try:
        if head.weight.shape[1:] != (embedding_size,):
            raise CheckpointError(f"head rows have shape {tuple(head.weight.shape)}, expected [*, {embedding_size}]")
        _save({"class_start": head.class_start, "num_local": head.num_local, "weight": head.weight.detach().cpu(),
               "optimizer": {k: v.detach().cpu() for k, v in head.optimizer.items()},
               "optimizer_rest": head.optimizer_rest}, tmp / head_file(ctx.rank))
        _save({**(rank_state or {}), "rng": capture_rng_state(ctx.device)}, tmp / rank_state_file(ctx.rank))
        if ctx.is_main:
            if backbone is not None:
                _save(backbone, tmp / "backbone.pt")
            if backbone_optim is not None:
                _save(backbone_optim, tmp / "optim-backbone.pt")
            _save({**train_state, "step": step, "epoch": epoch}, tmp / "train_state.pt")
            (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        if extra_writer is not None:
            extra_writer(tmp)
    except Exception as exc:  # reported to every rank below, so none waits forever
        error = f"{type(exc).__name__}: {exc}"
    reports = _gather(ctx, (error, head.class_start, head.num_local))

    error = None
    if ctx.is_main:
        try:
            _raise_if_failed([r[0] for r in reports], f"saving {tmp}")
            ranges = [(start, count) for _, start, count in reports]
            _publish(root, tmp, name, step=step, epoch=epoch, config=config, ranges=ranges)
            if keep > 0:
                prune(root, keep)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
    error = _broadcast(ctx, error)
    if error:
        raise CheckpointError(error)
    return root / name


def _publish(root: Path, tmp: Path, name: str, *, step: int, epoch: int, config: Config,
             ranges: list[tuple[int, int]]) -> None:
    """Rank 0: check the shards, write the manifest last, fsync, rename into place."""
    num_classes = config.data.num_classes
    expected_start = 0
    for rank, (start, count) in enumerate(ranges):
        if start != expected_start or count < 1:
            raise CheckpointError(f"head shards do not tile the classes: rank {rank} holds [{start}, {start + count}) "
                                  f"but the next class is {expected_start}")
        expected_start = start + count
    if expected_start != num_classes:
        raise CheckpointError(f"head shards cover {expected_start} classes but data.num_classes is {num_classes}")
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.relative_to(tmp).as_posix()] = path.stat().st_size
    missing = [head_file(r) for r in range(len(ranges)) if head_file(r) not in files]
    if missing:
        raise CheckpointError(f"{tmp}: {', '.join(missing)} not visible from rank 0; the checkpoint folder "
                              "must be on a filesystem shared by all ranks")
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "world_size": len(ranges),
        "num_classes": num_classes,
        "embedding_size": config.backbone.embedding_size,
        "config_hash": config.config_hash(),
        "shards": [{"rank": r, "file": head_file(r), "class_start": s, "num_local": n}
                   for r, (s, n) in enumerate(ranges)],
        "files": files,
        "complete": True,
    }
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    for folder in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, key=lambda p: -len(p.parts)):
        _fsync_dir(folder)
    final = root / name
    old = None
    if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
        old = root / f"{name}.old-{secrets.token_hex(4)}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- finding, pruning


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete checkpoint, or ``None`` when it is.

    Complete means: a parseable manifest with ``"complete": true`` whose every listed file
    exists with the recorded size (a truncated file is caught without reading it).
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"{path / MANIFEST} is missing"
    except (OSError, json.JSONDecodeError) as exc:
        return f"{path / MANIFEST} is unreadable: {exc}"
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return f"{path / MANIFEST} is not marked complete"
    files = manifest.get("files", {})
    unlisted = [s.get("file") for s in manifest.get("shards", []) if s.get("file") not in files]
    if unlisted:
        return f"{path / MANIFEST} names head shards it does not list as files: {unlisted}"
    for name, size in files.items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{path / name} is listed in the manifest but missing"
        if actual != size:
            return f"{path / name} has {actual} bytes, the manifest recorded {size}"
    return None


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first; partial and temporary folders are skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and checkpoint_problem(child) is None:
            steps.append((int(match.group(1)), child))
    return [p for _, p in sorted(steps)]


def find_latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or ``None``."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints and any leftover temporary folders.

    Incomplete ``step-*`` folders are left alone: they are never read, and may be worth a look.
    Call only while no save is in progress (``save_checkpoint`` does so on rank 0).
    """
    root = Path(root)
    doomed = list_checkpoints(root)[:-keep] if keep > 0 else []
    doomed += [p for p in root.iterdir() if _STALE_DIR.match(p.name) and p.is_dir()]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def resume_path(resume: str, root: str | os.PathLike) -> Path | None:
    """What ``train.resume`` points at: ``"auto"`` the newest complete checkpoint under ``root``
    (``None`` on a fresh run), ``""`` nothing, otherwise a step folder or a folder of them."""
    if resume == "":
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(resume)
    if _STEP_DIR.match(path.name) or (path / MANIFEST).exists():
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"train.resume={resume!r}: {problem}")
        return path
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(f"train.resume={resume!r}: no complete checkpoint in {path}")
    return latest


# ---------------------------------------------------------------------------------- loading


def _load(path: Path, map_location: Any = "cpu") -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be loaded: {exc}") from None


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete checkpoint; :class:`CheckpointError` if it is not complete."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is incomplete: {problem}")
    return json.loads((path / MANIFEST).read_text())


def check_compatible(path: str | os.PathLike, *, num_classes: int, embedding_size: int) -> dict[str, Any]:
    """Refuse a checkpoint whose class count or embedding size differ from the run's."""
    manifest = read_manifest(path)
    mismatches = [f"{key} is {manifest[key]} in the checkpoint but {want} in the config"
                  for key, want in (("num_classes", num_classes), ("embedding_size", embedding_size))
                  if manifest[key] != want]
    if mismatches:
        raise CheckpointError(f"{Path(path) / MANIFEST}: incompatible checkpoint: " + "; ".join(mismatches)
                              + " (start fresh with train.resume=\"\" or point train.output elsewhere)")
    return manifest


def reshard_rows(ckpt_dir: str | os.PathLike, class_start: int, num_local: int) -> HeadShard:
    """Rows ``[class_start, class_start + num_local)`` and their per-row optimizer state,
    assembled from whichever saved shards overlap them, whatever the saved world size."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    end = class_start + num_local
    if class_start < 0 or num_local < 1 or end > manifest["num_classes"]:
        raise CheckpointError(f"{ckpt_dir}: rows [{class_start}, {end}) are outside the "
                              f"{manifest['num_classes']} saved classes")
    weight: torch.Tensor | None = None
    optimizer: dict[str, torch.Tensor] = {}
    optimizer_rest: dict[str, Any] | None = None
    filled = 0
    for shard in manifest["shards"]:
        lo, hi = max(class_start, shard["class_start"]), min(end, shard["class_start"] + shard["num_local"])
        if lo >= hi:
            continue
        saved = _load(ckpt_dir / shard["file"])
        src = slice(lo - shard["class_start"], hi - shard["class_start"])
        dst = slice(lo - class_start, hi - class_start)
        if weight is None:
            weight = saved["weight"].new_empty((num_local, *saved["weight"].shape[1:]))
            optimizer = {k: v.new_empty((num_local, *v.shape[1:])) for k, v in saved["optimizer"].items()}
            optimizer_rest = saved["optimizer_rest"]
        if set(saved["optimizer"]) != set(optimizer):
            raise CheckpointError(f"{ckpt_dir / shard['file']}: per-row optimizer state {sorted(saved['optimizer'])} "
                                  f"differs from the other shards' {sorted(optimizer)}")
        weight[dst] = saved["weight"][src]
        for key, value in saved["optimizer"].items():
            optimizer[key][dst] = value[src]
        filled += hi - lo
    if weight is None or filled != num_local:
        raise CheckpointError(f"{ckpt_dir}: the saved shards cover {filled} of the {num_local} rows "
                              f"[{class_start}, {end})")
    return HeadShard(class_start, num_local, weight, optimizer, optimizer_rest or {})


def load_checkpoint(
    path: str | os.PathLike,
    ctx: DistContext,
    *,
    num_classes: int,
    embedding_size: int,
    class_start: int,
    num_local: int,
    map_location: Any = "cpu",
) -> LoadedCheckpoint:
    """Load a complete checkpoint for this rank, re-sharding the head rows to
    ``[class_start, class_start + num_local)`` (this rank's range in the new run)."""
    path = Path(path)
    manifest = check_compatible(path, num_classes=num_classes, embedding_size=embedding_size)
    files = manifest["files"]

    def optional(name: str) -> Any:
        return _load(path / name, map_location) if name in files else None

    same_world = manifest["world_size"] == ctx.world_size
    return LoadedCheckpoint(
        path=path,
        manifest=manifest,
        config=json.loads((path / "config.json").read_text()),
        backbone=optional("backbone.pt"),
        backbone_optim=optional("optim-backbone.pt"),
        head=reshard_rows(path, class_start, num_local),
        train_state=_load(path / "train_state.pt", map_location),
        rank_state=optional(rank_state_file(ctx.rank)) if same_world else None,
    )
