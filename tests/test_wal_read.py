"""The WAL read path (Wal.read_from over the seq -> offset index, layout.decode_indexed): records
come back intact and in order across segments, bytes that rot after open are left out and
forgotten, read descriptors follow segment deletion, and a reopen reads the same records."""

from __future__ import annotations

import os

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxrig.wal import Wal, WalRecord
from fluxrig.wal.layout import decode_indexed, wrap_payload
from fluxrig.wal.log import MIN_SEGMENT_BYTES
from fluxrig.wal.record import encode_record


def records_blob(seqs, sizes, base=0):
    blob, offsets = b"", []
    for seq, n in zip(seqs, sizes):
        offsets.append(base + len(blob))
        blob += encode_record(wrap_payload(seq, bytes([seq & 0xFF]) * n))
    return blob, offsets


@given(
    st.lists(st.integers(0, 300), min_size=1, max_size=12),
    st.integers(0, 2**40),
)
def test_decode_indexed_round_trip_every_head_size(sizes, first):
    seqs = [first + i * 70_000 for i in range(len(sizes))]  # seq heads of 1, 2, 3, 5 and 9 bytes
    blob, offsets = records_blob(seqs, sizes, base=40)
    got, lost = decode_indexed(blob, 40, offsets, seqs, WalRecord)
    assert lost == []
    assert got == [WalRecord(s, bytes([s & 0xFF]) * n) for s, n in zip(seqs, sizes)]


@settings(max_examples=300)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8), st.integers(0, 399))
def test_decode_indexed_never_raises_on_garbage(data, offsets, flip):
    offsets = sorted(offsets)
    seqs = list(range(1, len(offsets) + 1))
    got, lost = decode_indexed(data, 0, offsets, seqs, WalRecord)
    assert len(got) + len(lost) == len(offsets)


def test_decode_indexed_leaves_out_damaged_and_renumbered_records():
    seqs = [5, 6, 7, 8]
    blob, offsets = records_blob(seqs, [10, 10, 10, 10])
    data = bytearray(blob)
    data[offsets[1] + 12] ^= 1  # body bit flip: CRC
    got, lost = decode_indexed(bytes(data), 0, offsets, [5, 6, 9, 8], WalRecord)  # 7 is not 9
    assert [r.seq for r in got] == [5, 8] and lost == [6, 9]
    got, lost = decode_indexed(blob[:-3], 0, offsets, seqs, WalRecord)  # cut short
    assert [r.seq for r in got] == [5, 6, 7] and lost == [8]


def test_read_from_across_segments_and_after_reopen(tmp_path):
    opts = dict(fsync="never", segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None)
    payloads = [cbor2.dumps({"i": i, "pad": b"z" * (i % 700)}) for i in range(400)]
    with Wal(tmp_path, **opts) as w:
        for p in payloads:
            w.stage(p)
        w.commit()
        assert len([n for n in os.listdir(tmp_path) if n.endswith(".seg")]) >= 2
        seen, seq = [], 1
        while got := w.read_from(seq, 37, max_bytes=5000):
            seen += got
            seq = got[-1].seq + 1
        assert [r.payload for r in seen] == payloads and [r.seq for r in seen] == list(range(1, 401))
    with Wal(tmp_path, **opts) as w:
        assert [r.payload for r in w.read_from(1, 1000, max_bytes=10**9)] == payloads


def test_read_descriptors_follow_segment_deletion(tmp_path):
    with Wal(tmp_path, fsync="never", segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None) as w:
        for i in range(200):
            w.stage(b"\x41" * 2000 + b"%d" % i)
        w.commit()
        w.read_from(1, 1000, max_bytes=10**9)
        first_path = w._segments[0].path
        assert first_path in w._read_fds
        last_of_first = w._segments[0].seqs[-1]
        w.ack_range(1, last_of_first)
        w.persist_cursor()
        assert not os.path.exists(first_path)
        got = w.read_from(last_of_first + 1, 5)
        assert [r.seq for r in got] == list(range(last_of_first + 1, last_of_first + 6))
        assert first_path not in w._read_fds  # closed at the next read
        fds = list(w._read_fds.values())
    for fd in fds:  # close() released them
        try:
            os.fstat(fd)
        except OSError:
            continue
        raise AssertionError(f"descriptor {fd} still open after close")


def test_rot_after_open_is_left_out_counted_and_does_not_hold_the_cursor(tmp_path):
    with Wal(tmp_path, fsync="never", max_size_bytes=None) as w:
        for i in range(10):
            w.stage(b"record %d" % i)
        w.commit()
        assert len(w.read_from(1, 10)) == 10  # the descriptor is cached now
        name, off = w.locate(4)
        with open(tmp_path / name, "r+b") as fh:
            fh.seek(off + 10)
            fh.write(b"\xee")
        got = w.read_from(1, 10)
        assert [r.seq for r in got] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
        assert w.metrics()["read_lost_records"] == 1
        assert w.ack_many([r.seq for r in got]) == 10
