"""RecordIO: MXNet fixtures read back exactly, our writer reproduces MXNet's bytes, bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gbcosface.data.recordio import (
    MAGIC,
    CorruptRecordError,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    detect_layout,
    encode_record,
    pack_header,
    scan_offsets,
    unpack_header,
)

FIX = Path(__file__).parent / "fixtures" / "mxnet"
EXPECTED = json.loads((FIX / "expected.json").read_text())
MAGIC_BYTES = struct.pack("<I", MAGIC)


def _assert_header(header: IRHeader, want: dict) -> None:
    assert header.flag == want["flag"]
    assert header.id == want["id"] and header.id2 == want["id2"]
    if want["flag"] > 0:
        assert isinstance(header.label, np.ndarray) and header.label.dtype == np.float32
        assert header.label.tolist() == want["label"]
    else:
        assert header.label == want["label"]


@pytest.mark.parametrize("name", ["indexed", "insightface"])
def test_reads_mxnet_fixture_exactly(name):
    spec = EXPECTED[name]
    with RecordReader(FIX / spec["rec"], FIX / spec["idx"]) as reader:
        assert reader.keys() == spec["keys"]
        assert len(reader) == len(spec["records"])
        for entry in spec["records"]:
            raw = reader.read_raw(entry["key"])
            assert raw.hex() == entry["mx_raw"], entry["key"]
            assert raw.hex() == entry["raw"], entry["key"]  # MXNet gives back what it was given
            if "header" in entry:
                header, payload = reader[entry["key"]]
                _assert_header(header, entry["header"])
                assert payload.hex() == entry["payload"]


def test_fixture_has_multipart_records():
    """The fixture really exercises the continuation flags (guards against a weaker fixture)."""
    data = (FIX / "indexed.rec").read_bytes()
    flags = {struct.unpack_from("<I", data, i + 4)[0] >> 29
             for i in range(0, len(data) - 8, 4) if data[i:i + 4] == MAGIC_BYTES}
    assert {0, 1, 2, 3} <= flags


def test_png_record_decodes_to_mxnet_pixels():
    entry = next(e for e in EXPECTED["indexed"]["records"] if e["key"] == 9)
    reader = RecordReader(FIX / "indexed.rec", FIX / "indexed.idx")
    header, payload = reader[9]
    assert header.label.tolist() == [9.0, 1.0]
    pixels = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
    np.testing.assert_array_equal(pixels, np.asarray(entry["pixels_rgb"], dtype=np.uint8))


@pytest.mark.parametrize("name", ["indexed", "insightface"])
def test_writer_reproduces_mxnet_bytes(tmp_path, name):
    spec = EXPECTED[name]
    rec, idx = tmp_path / "out.rec", tmp_path / "out.idx"
    with RecordWriter(rec, idx) as writer:
        for entry in spec["records"]:
            if entry["kind"] == "pack":
                h = entry["header"]
                writer.write(entry["key"], IRHeader(h["flag"], h["label"], h["id"], h["id2"]),
                             bytes.fromhex(entry["payload"]))
            else:
                writer.write_raw(entry["key"], bytes.fromhex(entry["raw"]))
    assert rec.read_bytes() == (FIX / spec["rec"]).read_bytes()
    assert idx.read_bytes() == (FIX / spec["idx"]).read_bytes()


def test_pack_header_matches_mxnet_pack():
    for entry in EXPECTED["indexed"]["records"] + EXPECTED["insightface"]["records"]:
        if entry["kind"] == "pack":
            h = entry["header"]
            packed = pack_header(IRHeader(h["flag"], h["label"], h["id"], h["id2"]), bytes.fromhex(entry["payload"]))
            assert packed.hex() == entry["raw"]


def test_sequential_file_scan_matches_mxnet_reader(tmp_path):
    spec = EXPECTED["sequential"]
    assert spec["mx_read"] == spec["written"]
    shutil.copy(FIX / spec["rec"], tmp_path / "seq.rec")
    reader = RecordReader(tmp_path / "seq.rec", rebuild_missing_index=True)
    assert [reader.read_raw(k).hex() for k in reader.keys()] == spec["mx_read"]
    # our framing of the same payloads is byte-identical to MXNet's sequential writer
    assert b"".join(encode_record(bytes.fromhex(p)) for p in spec["written"]) == (FIX / spec["rec"]).read_bytes()


def test_insightface_layout_detected():
    spec = EXPECTED["insightface"]
    layout = detect_layout(RecordReader(FIX / spec["rec"], FIX / spec["idx"]))
    assert layout.kind == "insightface"
    assert layout.image_keys.tolist() == list(range(1, spec["num_images"] + 1))
    n = spec["num_images"]
    assert layout.identity_keys.tolist() == list(range(n + 1, n + 1 + spec["num_classes"]))
    plain = detect_layout(RecordReader(FIX / "indexed.rec", FIX / "indexed.idx"))
    assert plain.kind == "plain" and sorted(plain.image_keys.tolist()) == sorted(EXPECTED["indexed"]["keys"])


def test_rebuild_index_offsets_match_mxnet_index():
    want = sorted(int(line.split("\t")[1]) for line in (FIX / "indexed.idx").read_text().splitlines())
    assert scan_offsets(FIX / "indexed.rec") == want


# --------------------------------------------------------------------------- round trips

_HEADERS = [
    IRHeader(0, 0.0, 0, 0),
    IRHeader(0, -3.25, 1, 2),
    IRHeader(5, 7.0, 3, 4),  # scalar label: pack forces flag 0, like MXNet
    IRHeader(0, np.array([1.0, 2.5, -1.0], dtype=np.float32), 2 ** 64 - 1, 2 ** 33),
    IRHeader(0, [4.0], 0, 0),
    IRHeader(0, np.zeros(0, dtype=np.float32), 0, 0),  # empty array: flag 0, label 0.0
]


def _expected_unpack(header: IRHeader) -> tuple[int, object]:
    """Independent statement of MXNet's pack semantics: flag = array size, else 0."""
    if isinstance(header.label, (int, float)):
        return 0, float(header.label)
    arr = np.asarray(header.label, dtype=np.float32)
    return (arr.size, arr.tolist()) if arr.size else (0, 0.0)


def _payloads(rng: np.random.Generator) -> list[bytes]:
    out = [b"", b"a", b"ab", b"abc", MAGIC_BYTES, MAGIC_BYTES * 4, bytes(rng.integers(0, 256, 1000, dtype=np.uint8))]
    for _ in range(20):
        n = int(rng.integers(0, 64))
        buf = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        for _ in range(int(rng.integers(0, 4))):
            if n >= 4:
                p = int(rng.integers(0, n - 3))
                buf[p:p + 4] = MAGIC_BYTES
        out.append(bytes(buf))
    return out


def test_round_trip_every_header_variant_and_multipart(tmp_path):
    rng = np.random.default_rng(0)
    rec, idx = tmp_path / "rt.rec", tmp_path / "rt.idx"
    written = {}
    with RecordWriter(rec, idx) as w:
        key = 0
        for header in _HEADERS:
            for payload in _payloads(rng):
                w.write(key * 3 + 1, header, payload)  # sparse keys: the searchsorted path
                written[key * 3 + 1] = (header, payload)
                key += 1
    reader = RecordReader(rec, idx)
    assert len(reader) == len(written)
    for k, (header, payload) in written.items():
        got, got_payload = reader[k]
        flag, label = _expected_unpack(header)
        assert got.flag == flag and got.id == header.id and got.id2 == header.id2
        assert (got.label.tolist() if flag else got.label) == label
        assert got_payload == payload
    # the file is a valid stream: scanning finds exactly one record per write, at the indexed offsets
    assert scan_offsets(rec) == sorted(reader.offset(k) for k in written)


def test_unpack_header_rejects_short_records():
    with pytest.raises(RecordIOError, match="shorter than"):
        unpack_header(b"abc")
    with pytest.raises(RecordIOError, match="3 float labels"):
        unpack_header(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 4)


def test_reader_works_after_pickling(tmp_path):
    import pickle

    reader = RecordReader(FIX / "indexed.rec", FIX / "indexed.idx")
    reader.read_raw(10)  # opens the map in this process
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read_raw(3) == reader.read_raw(3)


# --------------------------------------------------------------------------- bad input


def _copy_fixture(tmp_path: Path) -> tuple[Path, Path]:
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    shutil.copy(FIX / "indexed.rec", rec)
    shutil.copy(FIX / "indexed.idx", idx)
    return rec, idx


def test_missing_index_names_file_and_reindex(tmp_path):
    rec, idx = _copy_fixture(tmp_path)
    idx.unlink()
    with pytest.raises(FileNotFoundError, match=r"x\.idx.*reindex"):
        RecordReader(rec, idx)


def test_wrong_magic_names_file_key_offset(tmp_path):
    rec, idx = _copy_fixture(tmp_path)
    data = bytearray(rec.read_bytes())
    data[40:44] = b"\x00\x01\x02\x03"  # key 3 sits at offset 40
    rec.write_bytes(bytes(data))
    reader = RecordReader(rec, idx)
    with pytest.raises(CorruptRecordError, match=r"x\.rec: record key 3 at byte offset 40: wrong magic") as e:
        reader[3]
    assert (e.value.key, e.value.offset) == (3, 40)
    assert reader[10][1] == b"hello"  # other records still read


def test_truncated_file(tmp_path):
    rec, idx = _copy_fixture(tmp_path)
    rec.write_bytes(rec.read_bytes()[:1180])  # key 9 starts at 1172 and is longer
    reader = RecordReader(rec, idx)
    with pytest.raises(CorruptRecordError, match=r"record key 9 at byte offset 1172: truncated"):
        reader[9]


def test_offset_past_end(tmp_path):
    rec, idx = _copy_fixture(tmp_path)
    idx.write_text(idx.read_text() + "99\t100000\n")
    with pytest.raises(CorruptRecordError, match=r"record key 99 at byte offset 100000: index offset is past the end"):
        RecordReader(rec, idx)[99]


def test_malformed_index_line(tmp_path):
    rec, idx = _copy_fixture(tmp_path)
    idx.write_text(idx.read_text() + "oops\n")
    with pytest.raises(RecordIOError, match=r"x\.idx: line 17"):
        RecordReader(rec, idx)


@pytest.mark.parametrize("keys", [[1, 1], [1, 5, 3, 5], [2, 0, 2]])
def test_writer_rejects_duplicate_key_and_leaves_no_partial_file(tmp_path, keys):
    rec = tmp_path / "d.rec"
    with pytest.raises(RecordIOError, match=f"record key {keys[-1]} written twice"):
        with RecordWriter(rec) as w:
            for k in keys:
                w.write(k, IRHeader(0, 1.0, 0, 0), b"a")
    assert os.listdir(tmp_path) == []


def test_index_with_duplicate_key(tmp_path):
    rec, idx = _copy_fixture(tmp_path)
    idx.write_text(idx.read_text() + "3\t0\n")
    with pytest.raises(RecordIOError, match=r"x\.idx: record key 3 appears more than once"):
        RecordReader(rec, idx)


def test_sorted_dense_and_sparse_indexes_agree(tmp_path):
    """The three lookup paths (ascending dense, ascending sparse, unsorted) find the same records."""
    payloads = {k: f"rec{k}".encode() for k in range(10)}
    for name, order in [("dense", list(range(10))), ("sparse", [0, 2, 4, 6, 8]), ("unsorted", [7, 1, 9, 0, 4])]:
        rec = tmp_path / f"{name}.rec"
        with RecordWriter(rec) as w:
            for k in order:
                w.write_raw(k, payloads[k])
        reader = RecordReader(rec)
        assert reader.keys() == order
        assert all(reader.read_raw(k) == payloads[k] for k in order)
        assert reader.offsets_for(np.array(order[::-1])).tolist() == [reader.offset(k) for k in order[::-1]]
        with pytest.raises(KeyError, match="no record key 11"):
            reader.offsets_for(np.array([order[0], 11]))
        assert all(k not in reader for k in set(range(-1, 12)) - set(order))


def test_broken_continuation_named(tmp_path):
    rec, idx = _copy_fixture(tmp_path)
    data = bytearray(rec.read_bytes())
    # key 4 (offset 188) is multi-part; make its first part claim to be a middle part (cflag 2)
    lrec = struct.unpack_from("<I", data, 192)[0]
    struct.pack_into("<I", data, 192, (2 << 29) | (lrec & ((1 << 29) - 1)))
    rec.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match=r"record key 4 at byte offset 188: unexpected continuation flag 2"):
        RecordReader(rec, idx).read_raw(4)


def test_rebuild_scan_reports_garbage_offset(tmp_path):
    rec, _ = _copy_fixture(tmp_path)
    rec.write_bytes(rec.read_bytes() + b"junkjunk")
    size = rec.stat().st_size
    with pytest.raises(CorruptRecordError, match=rf"x\.rec: record at byte offset {size - 8}: wrong magic"):
        scan_offsets(rec)
