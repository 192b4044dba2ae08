"""Data tools: ``python -m gbcosface.data.pack {pack,shuffle,inspect,reindex}``.

``pack``     a folder of identity sub-folders (or a list file) -> InsightFace-layout .rec/.idx
             plus a ``property`` file ``classes,height,width``
``shuffle``  an InsightFace (or plain) .rec -> image records only, globally shuffled by a seed,
             keys 0..n-1: what DALI and other plain readers want
``inspect``  counts, layout, classes, label range and the first records
``reindex``  rebuild a lost .idx by scanning the .rec

InsightFace layout: record 0 is a header whose label is ``(n + 1, n + 1 + classes)``; images are
keys ``1..n`` sorted by class with a scalar label; record ``n + 1 + c`` is identity ``c`` with
label ``(first image key, one past its last)``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..progress import Progress
from .images import decode_image, encode_jpeg
from .recordio import (
    CorruptRecordError,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    default_index_path,
    detect_layout,
    first_label,
    scan_offsets,
    write_index,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataToolError(ValueError):
    """Bad input to a data tool; the message names the file, line or record."""


# --------------------------------------------------------------------------- writing


def write_property(folder: str | os.PathLike, classes: int, height: int, width: int) -> str:
    path = os.path.join(folder, "property")
    with open(path, "w") as f:
        f.write(f"{classes},{height},{width}\n")
    return path


def read_property(folder: str | os.PathLike) -> tuple[int, int, int] | None:
    """``(classes, height, width)`` from an InsightFace ``property`` file, or None when absent."""
    path = os.path.join(folder, "property")
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        classes, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise DataToolError(f"{path}: expected 'classes,height,width', got {text!r}") from None
    return classes, h, w


def write_insightface(path_rec: str | os.PathLike, path_idx: str | os.PathLike | None, labels: Sequence[int],
                      payloads: Iterable[bytes], num_classes: int) -> None:
    """Write images (already sorted by label) in InsightFace's layout, header and identities included."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0:
        raise DataToolError(f"{path_rec}: nothing to write")
    if np.any(np.diff(labels) < 0) or labels[0] < 0 or labels[-1] >= num_classes:
        raise DataToolError(f"{path_rec}: labels must be sorted and inside [0, {num_classes})")
    starts = 1 + np.searchsorted(labels, np.arange(num_classes), side="left")
    ends = 1 + np.searchsorted(labels, np.arange(num_classes), side="right")
    with RecordWriter(path_rec, path_idx) as w:
        w.write(0, IRHeader(2, [n + 1, n + 1 + num_classes], 0, 0), b"")
        written = 0
        for key, payload in enumerate(payloads, 1):
            if key > n:
                raise DataToolError(f"{path_rec}: more images than labels ({n})")
            w.write(key, IRHeader(0, float(labels[key - 1]), key, 0), payload)
            written += 1
        if written != n:
            raise DataToolError(f"{path_rec}: {written} images for {n} labels")
        for c in range(num_classes):
            w.write(n + 1 + c, IRHeader(2, [float(starts[c]), float(ends[c])], 0, 0), b"")


def _list_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    if not root.is_dir():
        raise DataToolError(f"{root}: not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataToolError(f"{root}: no identity sub-folders (expected ROOT/<identity>/<image>.jpg)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataToolError(f"{root / name}: identity folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    return paths, labels, classes


def _read_list(list_file: Path, root: Path | None) -> tuple[list[str], list[int]]:
    """Lines ``path<TAB>label`` or im2rec's ``index<TAB>label<TAB>path``; paths relative to ``root``."""
    if not list_file.is_file():
        raise DataToolError(f"{list_file}: list file not found")
    base = root or list_file.parent
    paths, labels = [], []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        fields = line.strip().split("\t") if "\t" in line else line.split()
        if not fields or not line.strip():
            continue
        try:
            if len(fields) == 2:
                path, label = fields[0], float(fields[1])
            elif len(fields) == 3:
                path, label = fields[2], float(fields[1])
            else:
                raise ValueError
            if label != int(label) or label < 0:
                raise ValueError
        except ValueError:
            raise DataToolError(f"{list_file}: line {lineno}: expected 'path<TAB>label' or "
                                f"'index<TAB>label<TAB>path' with a non-negative integer label: {line!r}") from None
        paths.append(str(base / path))
        labels.append(int(label))
    if not paths:
        raise DataToolError(f"{list_file}: no entries")
    return paths, labels


def _load_image(args: tuple[str, int, int]) -> bytes:
    """Image file -> JPEG bytes of ``size x size``; aligned JPEGs of the right size pass through untouched."""
    path, size, quality = args
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataToolError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        img = decode_image(data)
    except ValueError as exc:
        raise DataToolError(f"{path}: {exc}") from None
    if img.shape[:2] == (size, size) and data[:2] == b"\xff\xd8":
        return data
    if img.shape[0] != img.shape[1]:
        raise DataToolError(f"{path}: image is {img.shape[1]}x{img.shape[0]}; expected square aligned face crops")
    if img.shape[0] != size:
        from PIL import Image

        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return encode_jpeg(img, quality)


def _parallel(fn, jobs: Sequence, workers: int, progress: Progress) -> Iterator:
    """Ordered map over a process pool (or inline for one worker), advancing ``progress``."""
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            yield fn(job)
            progress.update()
        return
    with mp.get_context().Pool(workers) as pool:
        for out in pool.imap(fn, jobs, chunksize=max(1, min(256, len(jobs) // (workers * 8)))):
            yield out
            progress.update()


def pack(source: str | os.PathLike, out_prefix: str | os.PathLike, *, image_size: int = 112, quality: int = 95,
         workers: int = 1, root: str | os.PathLike | None = None, verbose: bool = True) -> dict:
    """Pack a folder of identity folders or a list file into ``out_prefix.rec/.idx`` + ``property``."""
    source = Path(source)
    if source.is_dir():
        paths, labels, names = _list_folder(source)
        num_classes = len(names)
    else:
        paths, labels = _read_list(source, Path(root) if root else None)
        num_classes = max(labels) + 1
    order = np.argsort(np.asarray(labels), kind="stable")
    paths = [paths[i] for i in order]
    labels = [labels[i] for i in order]
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    rec, idx = f"{out_prefix}.rec", f"{out_prefix}.idx"
    progress = Progress(len(paths), desc="pack", unit="img", enabled=verbose, every_s=5)
    jpegs = _parallel(_load_image, [(p, image_size, quality) for p in paths], workers, progress)
    write_insightface(rec, idx, labels, jpegs, num_classes)
    write_property(out_prefix.parent, num_classes, image_size, image_size)
    return {"rec": rec, "idx": idx, "images": len(paths), "classes": num_classes}


def shuffle(src_rec: str | os.PathLike, out_prefix: str | os.PathLike, *, seed: int = 0,
            src_idx: str | os.PathLike | None = None, verbose: bool = True) -> dict:
    """Copy the image records (bytes untouched) in a seeded global order under keys 0..n-1."""
    reader = RecordReader(src_rec, src_idx)
    layout = detect_layout(reader)
    order = np.random.default_rng(seed).permutation(layout.image_keys)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    rec, idx = f"{out_prefix}.rec", f"{out_prefix}.idx"
    if os.path.abspath(rec) == os.path.abspath(reader.path_rec):
        raise DataToolError(f"{rec}: output would overwrite the input")
    progress = Progress(len(order), desc="shuffle", unit="rec", enabled=verbose, every_s=5)
    with RecordWriter(rec, idx) as w:
        for new_key, key in enumerate(order.tolist()):
            w.write_raw(new_key, reader.read_raw(key))
            progress.update()
    prop = read_property(Path(reader.path_rec).parent)
    if prop is not None and Path(rec).parent != Path(reader.path_rec).parent:
        write_property(Path(rec).parent, *prop)
    return {"rec": rec, "idx": idx, "images": len(order)}


def reindex(src_rec: str | os.PathLike, path_idx: str | os.PathLike | None = None, *, force: bool = False) -> dict:
    """Rebuild the index by scanning; keys are assigned in file order (0, 1, ...), which is the
    original numbering for files written in ascending key order (im2rec, InsightFace, ours)."""
    path_idx = str(path_idx) if path_idx else default_index_path(src_rec)
    if os.path.exists(path_idx) and not force:
        raise DataToolError(f"{path_idx}: index exists; pass --force to overwrite it")
    offsets = scan_offsets(src_rec)
    write_index(path_idx, range(len(offsets)), offsets)
    return {"idx": path_idx, "records": len(offsets)}


def inspect(src_rec: str | os.PathLike, src_idx: str | os.PathLike | None = None, *, show: int = 5,
            check: bool = False) -> dict:
    """Summary of a .rec: layout, image/identity counts, label range, the first records."""
    reader = RecordReader(src_rec, src_idx)
    layout = detect_layout(reader)
    keys = layout.image_keys
    labels, bad = [], []
    for k in keys.tolist():  # headers are cheap: every label, decoding only with check
        if not check:
            labels.append(first_label(reader[k][0]))
            continue
        try:
            header, payload = reader[k]
            labels.append(first_label(header))
            decode_image(payload)
        except CorruptRecordError as exc:
            bad.append(str(exc))
        except ValueError as exc:
            bad.append(f"{reader.path_rec}: record key {k} at byte offset {reader.offset(k)}: {exc}")
    first = []
    for k in keys[:show].tolist():
        header, payload = reader[k]
        try:
            shape = decode_image(payload).shape
        except ValueError:
            shape = None
        first.append({"key": k, "offset": reader.offset(k), "flag": header.flag,
                      "label": header.label.tolist() if header.flag else header.label,
                      "id": header.id, "bytes": len(payload), "image": shape})
    info = {"rec": reader.path_rec, "idx": reader.path_idx, "bytes": reader.file_size, "records": len(reader),
            "layout": layout.kind, "images": len(keys), "identity_records": len(layout.identity_keys),
            "classes_seen": len(set(labels)), "label_min": min(labels) if labels else None,
            "label_max": max(labels) if labels else None, "property": read_property(Path(reader.path_rec).parent),
            "first": first}
    if check:
        info["corrupt"] = bad
    return info


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gbcosface.data.pack", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="images -> InsightFace .rec/.idx + property")
    a.add_argument("source", help="folder of identity sub-folders, or a list file")
    a.add_argument("out", help="output prefix: writes OUT.rec, OUT.idx and property beside them")
    a.add_argument("--root", help="base folder for relative paths in a list file (default: its folder)")
    a.add_argument("--image-size", type=int, default=112)
    a.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    a.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    s = sub.add_parser("shuffle", help="image records only, globally shuffled, keys 0..n-1")
    s.add_argument("rec")
    s.add_argument("out", help="output prefix")
    s.add_argument("--idx")
    s.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("inspect", help="counts, classes, label range, first records")
    i.add_argument("rec")
    i.add_argument("--idx")
    i.add_argument("--show", type=int, default=5)
    i.add_argument("--check", action="store_true", help="read and decode every image record")
    r = sub.add_parser("reindex", help="rebuild the .idx by scanning the .rec")
    r.add_argument("rec")
    r.add_argument("--idx", help="index to write (default: REC with .idx)")
    r.add_argument("--force", action="store_true", help="overwrite an existing index")
    args = p.parse_args(argv)
    try:
        if args.cmd == "pack":
            res = pack(args.source, args.out, image_size=args.image_size, quality=args.quality,
                       workers=args.workers, root=args.root)
            print(f"packed {res['images']} images of {res['classes']} classes into {res['rec']}")
        elif args.cmd == "shuffle":
            res = shuffle(args.rec, args.out, seed=args.seed, src_idx=args.idx)
            print(f"wrote {res['images']} shuffled image records to {res['rec']}")
        elif args.cmd == "reindex":
            res = reindex(args.rec, args.idx, force=args.force)
            print(f"indexed {res['records']} records into {res['idx']}")
        else:
            info = inspect(args.rec, args.idx, show=args.show, check=args.check)
            for key in ("rec", "idx", "bytes", "records", "layout", "images", "identity_records", "classes_seen",
                        "label_min", "label_max", "property"):
                print(f"{key:>16}: {info[key]}")
            for rec in info["first"]:
                print(f"{'record':>16}: {rec}")
            if args.check:
                print(f"{'corrupt':>16}: {len(info['corrupt'])}")
                for msg in info["corrupt"]:
                    print(f"  {msg}")
                return 1 if info["corrupt"] else 0
    except (DataToolError, RecordIOError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
