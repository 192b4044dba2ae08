"""MXNet RecordIO (.rec + .idx) without MXNet, byte-compatible with its writer and reader.

Format (dmlc-core ``recordio``), all integers little-endian ``uint32``::

    record  := part+ ; each part = magic lrec data pad
    magic   := 0xced7230a
    lrec    := cflag << 29 | length        (length < 2**29)
    cflag   := 0 whole record | 1 first part | 2 middle part | 3 last part
    pad     := zero bytes up to a multiple of 4

The writer splits a record wherever its data holds the magic word at a 4-byte aligned offset
(relative to the start of the record) and drops that word; the reader puts it back between
parts. The ``.idx`` file is text, one ``key\\toffset`` line per record.

Image records begin with MXNet's ``IRHeader`` (struct ``'IfQQ'``: flag, label, id, id2); when
``flag > 0`` the label is instead a float32 array of ``flag`` values right after the header.

Reads are memory mapped and the map is opened lazily in each process, so a reader built in the
main process can be handed to DataLoader workers (forked or spawned).
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
from array import array
from pathlib import Path
from typing import Iterator, NamedTuple, Union

import numpy as np

MAGIC = 0xCED7230A
MAX_LENGTH = (1 << 29) - 1
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
IR_SIZE = _IR.size  # 24

Label = Union[float, np.ndarray]


class IRHeader(NamedTuple):
    """MXNet's image-record header. ``label`` is a float, or a float32 array when ``flag > 0``."""

    flag: int
    label: Label
    id: int
    id2: int


class RecordIOError(ValueError):
    """A .rec/.idx problem a user can cause; the message names the file, key and byte offset."""


class CorruptRecordError(RecordIOError):
    """One record cannot be read; carries ``path``, ``key`` and ``offset`` for skip-and-count."""

    def __init__(self, path: str | os.PathLike, key: int | None, offset: int | None, reason: str):
        self.path, self.key, self.offset, self.reason = str(path), key, offset, reason
        where = f"record key {key}" if key is not None else "record"
        at = f" at byte offset {offset}" if offset is not None else ""
        super().__init__(f"{self.path}: {where}{at}: {reason}")


# --------------------------------------------------------------------------- header


def pack_header(header: IRHeader | tuple, payload: bytes = b"") -> bytes:
    """Header + payload as MXNet's ``recordio.pack`` builds it.

    A scalar label forces ``flag = 0``; an array label sets ``flag`` to its length, stores 0.0 in
    the scalar slot and writes the float32 values after the header.
    """
    flag, label, id_, id2 = header
    if isinstance(label, (int, float, np.integer, np.floating)):
        return _IR.pack(0, float(label), int(id_), int(id2)) + bytes(payload)
    arr = np.asarray(label, dtype=np.float32).reshape(-1)
    return _IR.pack(arr.size, 0.0, int(id_), int(id2)) + arr.tobytes() + bytes(payload)


def unpack_header(record: bytes | memoryview) -> tuple[IRHeader, bytes]:
    """Split a record into its ``IRHeader`` and payload, as MXNet's ``recordio.unpack`` does."""
    if len(record) < IR_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = _IR.unpack_from(record, 0)
    rest = memoryview(record)[IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"IRHeader says {flag} float labels but only {len(rest)} bytes follow it")
        label = np.frombuffer(bytes(rest[: 4 * flag]), dtype=np.float32)
        rest = rest[4 * flag:]
    return IRHeader(flag, label, id_, id2), bytes(rest)


def first_label(header: IRHeader) -> float:
    """The class label of an image record (InsightFace stores it as a scalar or as label[0])."""
    return float(header.label[0]) if header.flag > 0 else float(header.label)


# --------------------------------------------------------------------------- record framing


def encode_record(data: bytes) -> bytes:
    """Frame ``data`` as one (possibly multi-part) RecordIO record, padding included."""
    n = len(data)
    if n > MAX_LENGTH:
        raise RecordIOError(f"record of {n} bytes exceeds the RecordIO limit of {MAX_LENGTH}")
    out = bytearray()
    start = 0
    pos = data.find(_MAGIC_BYTES)
    while pos != -1 and pos + 4 <= (n & ~3):
        if pos % 4 == 0:
            out += _PART.pack(MAGIC, (1 if start == 0 else 2) << 29 | (pos - start))
            out += data[start:pos]
            start = pos + 4
            pos = data.find(_MAGIC_BYTES, start)
        else:
            pos = data.find(_MAGIC_BYTES, pos + 1)
    out += _PART.pack(MAGIC, (3 if start else 0) << 29 | (n - start))
    out += data[start:]
    out += b"\0" * (-n % 4)
    return bytes(out)


def _decode_at(buf, offset: int, path: str, key: int | None) -> tuple[bytes, int]:
    """Read the record starting at ``offset``; return its data and the offset just after it."""
    size = len(buf)
    pieces: list[bytes] = []
    pos = offset
    first = True
    while True:
        if pos + 8 > size:
            raise CorruptRecordError(path, key, pos, f"truncated file: a record header needs 8 bytes, "
                                                      f"{max(size - pos, 0)} left (file is {size} bytes)")
        magic, lrec = _PART.unpack_from(buf, pos)
        if magic != MAGIC:
            raise CorruptRecordError(path, key, pos, f"wrong magic 0x{magic:08x} (expected 0x{MAGIC:08x})")
        cflag, length = lrec >> 29, lrec & MAX_LENGTH
        if first and cflag not in (0, 1) or not first and cflag not in (2, 3):
            raise CorruptRecordError(path, key, pos, f"unexpected continuation flag {cflag}")
        start = pos + 8
        end = start + length
        if end > size:
            raise CorruptRecordError(path, key, pos, f"truncated file: record part of {length} bytes "
                                                      f"runs past the end of the file ({size} bytes)")
        pieces.append(bytes(buf[start:end]))
        pos = start + ((length + 3) & ~3)
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(pieces), min(pos, size)
        first = False


def scan_offsets(path_rec: str | os.PathLike) -> list[int]:
    """Byte offsets of every record in a .rec file, in file order (to rebuild a lost index)."""
    path = str(path_rec)
    offsets = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return offsets
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = 0
            while pos < size:
                offsets.append(pos)
                _, pos = _decode_at(mm, pos, path, None)
    return offsets


def write_index(path_idx: str | os.PathLike, keys, offsets) -> None:
    """Write a ``key\\toffset`` index (atomically: a crash leaves no half-written index)."""
    tmp = f"{path_idx}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(f"{int(k)}\t{int(o)}\n" for k, o in zip(keys, offsets))
    os.replace(tmp, path_idx)


def default_index_path(path_rec: str | os.PathLike) -> str:
    return str(Path(path_rec).with_suffix(".idx"))


def _read_index(path_idx: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``key\toffset`` lines: numpy's text parser for speed (an index of 17M records
    in about a second), a line-by-line parser to name the line when that one fails."""
    with open(path_idx) as f:
        text = f.read()
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            flat = np.fromstring(text, dtype=np.int64, sep=" ")
        if flat.size == 2 * lines and (flat.size == 0 or flat[1::2].min() >= 0):
            return flat[0::2].copy(), flat[1::2].copy()
    except (ValueError, DeprecationWarning):
        pass
    keys, offsets = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            k, o = int(fields[0]), int(fields[1])
        except ValueError:
            raise RecordIOError(f"{path_idx}: line {lineno} is not 'key<TAB>offset': {line.rstrip()!r}") from None
        if o < 0:
            raise RecordIOError(f"{path_idx}: line {lineno}: record key {k} has a negative offset {o}")
        keys.append(k)
        offsets.append(o)
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


# --------------------------------------------------------------------------- reader


class RecordReader:
    """Random access to an indexed .rec file: ``reader[key] -> (IRHeader, payload bytes)``.

    Keys live in numpy arrays (not a dict) so an index of millions of records costs little memory
    and forks cheaply into DataLoader workers. A missing index is an error that names the
    ``reindex`` command, unless ``rebuild_missing_index=True`` asks to scan the .rec in memory.
    """

    def __init__(self, path_rec: str | os.PathLike, path_idx: str | os.PathLike | None = None,
                 rebuild_missing_index: bool = False):
        self.path_rec = str(path_rec)
        self.path_idx = str(path_idx) if path_idx is not None else default_index_path(path_rec)
        if not os.path.isfile(self.path_rec):
            raise FileNotFoundError(f"{self.path_rec}: RecordIO file not found")
        self.file_size = os.path.getsize(self.path_rec)
        if os.path.isfile(self.path_idx):
            self._keys, self._offsets = _read_index(self.path_idx)
        elif rebuild_missing_index:
            offsets = scan_offsets(self.path_rec)
            self._keys = np.arange(len(offsets), dtype=np.int64)
            self._offsets = np.asarray(offsets, dtype=np.int64)
        else:
            raise FileNotFoundError(
                f"{self.path_idx}: index for {self.path_rec} not found; rebuild it with "
                f"`python -m gbcosface.data.pack reindex {self.path_rec}`")
        # Usual case: keys ascending in the index, so no sorted copy is kept (millions of records).
        self._sorted_pos: np.ndarray | None = None
        self._sorted_keys = self._keys
        if np.any(np.diff(self._keys) <= 0):
            self._sorted_pos = np.argsort(self._keys, kind="stable")
            self._sorted_keys = self._keys[self._sorted_pos]
            dup = np.nonzero(np.diff(self._sorted_keys) == 0)[0]
            if dup.size:
                raise RecordIOError(f"{self.path_idx}: record key {int(self._sorted_keys[dup[0]])} "
                                    "appears more than once")
        n = len(self._keys)
        self._dense_start = (int(self._sorted_keys[0]) if n and
                             int(self._sorted_keys[-1]) - int(self._sorted_keys[0]) == n - 1 else None)
        self._mm: mmap.mmap | None = None
        self._file = None
        self._pid = -1

    # Workers get a copy without the map; each process maps the file on first use.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_mm=None, _file=None, _pid=-1)
        return state

    def _buffer(self):
        if self._mm is None or self._pid != os.getpid():
            self._file = open(self.path_rec, "rb")
            size = os.fstat(self._file.fileno()).st_size
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._pid = os.getpid()
        return self._mm

    def close(self) -> None:
        if self._mm is not None and self._pid == os.getpid():
            if isinstance(self._mm, mmap.mmap):
                self._mm.close()
            self._file.close()
        self._mm, self._file, self._pid = None, None, -1

    def __enter__(self) -> "RecordReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[int]:
        """Keys in index-file order (MXNet's ``MXIndexedRecordIO.keys``)."""
        return self._keys.tolist()

    def __contains__(self, key: int) -> bool:
        return self._position(int(key)) is not None

    def _position(self, key: int) -> int | None:
        """Row of ``key`` in the index file, or None."""
        if self._dense_start is not None:
            i = key - self._dense_start
            if not 0 <= i < len(self._keys):
                return None
        else:
            i = int(np.searchsorted(self._sorted_keys, key))
            if i >= len(self._sorted_keys) or self._sorted_keys[i] != key:
                return None
        return i if self._sorted_pos is None else int(self._sorted_pos[i])

    def offset(self, key: int) -> int:
        pos = self._position(int(key))
        if pos is None:
            raise KeyError(f"{self.path_idx}: no record key {key}")
        return int(self._offsets[pos])

    def offsets_for(self, keys: np.ndarray) -> np.ndarray:
        """Byte offsets of many keys at once (vectorised: building DALI's index of millions)."""
        keys = np.asarray(keys, dtype=np.int64)
        i = np.searchsorted(self._sorted_keys, keys)
        found = i < len(self._sorted_keys)
        found[found] = self._sorted_keys[i[found]] == keys[found]
        if not found.all():
            raise KeyError(f"{self.path_idx}: no record key {int(keys[~found][0])}")
        return self._offsets[i if self._sorted_pos is None else self._sorted_pos[i]]

    def read_raw(self, key: int) -> bytes:
        """The record's bytes exactly as written (header included), multi-part records joined."""
        off = self.offset(key)
        if off >= self.file_size:
            raise CorruptRecordError(self.path_rec, int(key), off,
                                     f"index offset is past the end of the file ({self.file_size} bytes)")
        data, _ = _decode_at(self._buffer(), off, self.path_rec, int(key))
        return data

    def __getitem__(self, key: int) -> tuple[IRHeader, bytes]:
        raw = self.read_raw(key)
        try:
            return unpack_header(raw)
        except RecordIOError as exc:
            raise CorruptRecordError(self.path_rec, int(key), self.offset(key), str(exc)) from None

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys())


# --------------------------------------------------------------------------- writer


class RecordWriter:
    """Write an indexed .rec file exactly as ``MXIndexedRecordIO(..., 'w')`` does.

    Files are written under temporary names and renamed on a clean ``close()``, so an
    interrupted pack never leaves a .rec that looks complete.
    """

    def __init__(self, path_rec: str | os.PathLike, path_idx: str | os.PathLike | None = None):
        self.path_rec = str(path_rec)
        self.path_idx = str(path_idx) if path_idx is not None else default_index_path(path_rec)
        self._tmp_rec = f"{self.path_rec}.tmp{os.getpid()}"
        self._tmp_idx = f"{self.path_idx}.tmp{os.getpid()}"
        self._rec = open(self._tmp_rec, "wb")
        self._idx = open(self._tmp_idx, "w")
        self._keys = array("q")  # 8 bytes a key; a set is built only if keys arrive out of order
        self._seen: set[int] | None = None
        self.count = 0

    def write_raw(self, key: int, record: bytes) -> int:
        """Append a record (already packed) under ``key``; returns its byte offset."""
        key = int(key)
        if self._seen is None and self._keys and key <= self._keys[-1]:
            self._seen = set(self._keys)
        if self._seen is not None:
            if key in self._seen:
                raise RecordIOError(f"{self.path_rec}: record key {key} written twice")
            self._seen.add(key)
        offset = self._rec.tell()
        self._rec.write(encode_record(bytes(record)))
        self._idx.write(f"{key}\t{offset}\n")
        self._keys.append(key)
        self.count += 1
        return offset

    def write(self, key: int, header: IRHeader | tuple, payload: bytes = b"") -> int:
        """Append ``pack_header(header, payload)`` under ``key``; returns its byte offset."""
        return self.write_raw(key, pack_header(header, payload))

    def close(self) -> None:
        if self._rec.closed:
            return
        self._rec.close()
        self._idx.close()
        os.replace(self._tmp_rec, self.path_rec)
        os.replace(self._tmp_idx, self.path_idx)

    def abort(self) -> None:
        """Close and delete the partial output."""
        if not self._rec.closed:
            self._rec.close()
            self._idx.close()
        for p in (self._tmp_rec, self._tmp_idx):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------- layouts


class Layout(NamedTuple):
    """Where the images are: InsightFace files start with a header record (key 0)."""

    kind: str  # "insightface" or "plain"
    image_keys: np.ndarray  # int64
    identity_keys: np.ndarray  # int64, empty for "plain"


def detect_layout(reader: RecordReader) -> Layout:
    """Find the image records of an InsightFace file or of plain im2rec output.

    InsightFace: record 0 has ``flag > 0``, ``label[0]`` = key of the first identity record
    (= 1 + number of images) and ``label[1]`` = one past the last identity key; images are keys
    ``1 .. label[0]-1``. Anything else is read as plain: every record is an image.
    """
    if 0 in reader:
        header, payload = reader[0]
        if header.flag >= 2 and len(payload) == 0:
            first_id, end_id = int(header.label[0]), int(header.label[1])
            if not (1 <= first_id <= end_id):
                raise CorruptRecordError(reader.path_rec, 0, reader.offset(0),
                                         f"InsightFace header record has an invalid key range "
                                         f"label=({header.label[0]}, {header.label[1]})")
            image_keys = np.arange(1, first_id, dtype=np.int64)
            missing = image_keys[~np.isin(image_keys, reader._keys)][:1]
            if missing.size:
                raise RecordIOError(f"{reader.path_idx}: the InsightFace header (record 0) says images are "
                                    f"keys 1..{first_id - 1} but record key {int(missing[0])} is not in the index")
            ids = np.arange(first_id, end_id, dtype=np.int64)
            ids = ids[np.isin(ids, reader._keys)]
            return Layout("insightface", image_keys, ids)
    return Layout("plain", np.asarray(reader.keys(), dtype=np.int64), np.zeros(0, dtype=np.int64))
