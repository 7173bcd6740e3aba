"""WAL recovery on open (fluxrig.wal.log): torn tails at every byte position, random bytes
written over segments, damaged headers, interrupted segment creation, a damaged cursor, the
seq bump past a damaged tail, and records that rot after open. Recovery must never raise on
damage, never need a human, keep every record's identity (seq -> payload), and leave a WAL
that accepts appends."""

from __future__ import annotations

import os
import random
import shutil

import cbor2
import pytest

from fluxrig.wal import Wal
from fluxrig.wal.layout import CURSOR_FILE, segment_name
from fluxrig.wal.log import MIN_SEGMENT_BYTES
from fluxrig.wal.record import SEGMENT_HEADER_BYTES


def payload(i: int, size: int = 8) -> bytes:
    return cbor2.dumps({"i": i, "p": b"z" * size})


def fill(d, n, size=8, **kw):
    kw.setdefault("fsync", "never")
    with Wal(d, **kw) as w:
        for i in range(1, n + 1):
            assert w.stage(payload(i, size)) == i
        w.commit()


def identity_holds(w):
    """Every readable record still carries the payload appended under its seq."""
    recs = w.read_from(0, 10**7, max_bytes=1 << 30)
    for r in recs:
        assert cbor2.loads(r.payload)["i"] == r.seq
    return recs


def test_torn_tail_at_every_byte_of_the_last_record(tmp_path):
    src = tmp_path / "src"
    fill(src, 6)
    seg = segment_name(1)
    full = (src / seg).read_bytes()
    with Wal(src, readonly=True) as ro:
        last_off = ro._segments[0].offsets[-1]
    last_len = len(full) - last_off
    for cut in range(1, last_len):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(src, d)
        with open(d / seg, "r+b") as fh:
            fh.truncate(last_off + cut)
        with Wal(d) as w:
            r = w.recovery
            assert (r.records_ok, r.torn_bytes_truncated, r.corrupt_records_skipped) == (5, cut, 0), cut
            assert os.path.getsize(d / seg) == last_off  # the torn tail is gone
            assert [x.seq for x in identity_holds(w)] == [1, 2, 3, 4, 5]
            new = w.append(payload(99))
            assert new >= 6  # never below what existed before
            w.commit()
        with Wal(d) as w:
            assert w.recovery.torn_bytes_truncated == 0 and w.recovery.records_ok == 6
            assert w.read_from(new, 1)[0].payload == payload(99)


def test_zero_filled_tail_is_truncated_as_torn(tmp_path):
    fill(tmp_path, 10)
    with open(tmp_path / segment_name(1), "ab") as fh:
        fh.write(bytes(4096))  # what a crash after a size update without the data leaves
    with Wal(tmp_path) as w:
        assert w.recovery.records_ok == 10
        assert w.recovery.torn_bytes_truncated == 4096
        assert w.recovery.corrupt_records_skipped == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_over_a_segment(tmp_path, seed):
    rnd = random.Random(seed)
    n = 3000
    fill(tmp_path, n, size=40, segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".seg"))
    victim = tmp_path / files[rnd.randrange(len(files) - 1)]
    data = bytearray(victim.read_bytes())
    for _ in range(3):
        at = rnd.randrange(SEGMENT_HEADER_BYTES, len(data) - 300)
        data[at : at + rnd.randint(1, 300)] = rnd.randbytes(300)[: rnd.randint(1, 300)]
    victim.write_bytes(bytes(data[: len(victim.read_bytes())]))
    with Wal(tmp_path, segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None) as w:
        r = w.recovery
        assert r.corrupt_records_skipped >= 1
        assert r.records_ok < n and r.records_ok >= n - 3 * 8  # a 300-byte hit covers <= 8 records
        recs = identity_holds(w)
        assert len(recs) == r.records_ok
        # later appends work and are numbered past everything that existed
        new = [w.append(payload(n + k)) for k in range(1, 4)]
        w.commit()
        assert new[0] > n
        assert [x.seq for x in w.read_from(new[0], 10)] == new
    with Wal(tmp_path, segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None) as w:
        # same damage counted again (it is in the middle, not cut), nothing else lost
        assert w.recovery.records_ok == r.records_ok + 3
        assert w.recovery.corrupt_records_skipped == r.corrupt_records_skipped
        # the shipper can still reach the end: acks skip the damaged seqs
        for x in identity_holds(w):
            w.ack(x.seq)
        assert w.cursor == new[-1]


def test_random_bytes_over_the_whole_active_segment(tmp_path):
    fill(tmp_path, 200)
    seg = tmp_path / segment_name(1)
    size = os.path.getsize(seg)
    seg.write_bytes(random.Random(5).randbytes(size))
    with Wal(tmp_path) as w:
        r = w.recovery
        assert r.records_ok == 0 and r.headers_damaged == 1
        assert r.corrupt_records_skipped + (r.torn_bytes_truncated > 0) >= 1
        assert r.next_seq > 1
        seq = w.append(payload(1000))
        w.commit()
    with Wal(tmp_path) as w:
        assert w.read_from(seq, 1)[0].payload == payload(1000)


def test_damaged_header_keeps_records(tmp_path):
    fill(tmp_path, 20)
    seg = tmp_path / segment_name(1)
    data = bytearray(seg.read_bytes())
    data[3] ^= 0xFF
    seg.write_bytes(bytes(data))
    with Wal(tmp_path) as w:
        assert w.recovery.headers_damaged == 1
        assert w.recovery.records_ok == 20
        assert len(identity_holds(w)) == 20


def test_interrupted_segment_creation(tmp_path):
    fill(tmp_path, 10)
    (tmp_path / segment_name(11)).write_bytes(b"FLUXW")  # crash while writing the header
    with Wal(tmp_path) as w:
        assert w.recovery.segments_repaired == 1
        assert w.recovery.records_ok == 10
        assert w.append(payload(11)) == 11
        w.commit()
    with Wal(tmp_path) as w:
        assert w.recovery.headers_damaged == 0 and w.recovery.records_ok == 11
        assert [r.seq for r in identity_holds(w)] == list(range(1, 12))


def test_interrupted_creation_of_a_middle_segment_is_removed(tmp_path):
    fill(tmp_path, 10)
    (tmp_path / segment_name(11)).write_bytes(b"")  # interrupted, then a later one was made
    (tmp_path / segment_name(500)).write_bytes(b"")
    with Wal(tmp_path) as w:
        assert not (tmp_path / segment_name(11)).exists()
        assert w.recovery.records_ok == 10
        assert w.append(payload(0)) >= 500


def test_damaged_cursor_resets_to_the_oldest_record(tmp_path):
    fill(tmp_path, 10)
    with Wal(tmp_path) as w:
        w.ack_many(range(1, 6))
        w.persist_cursor()
    (tmp_path / CURSOR_FILE).write_bytes(b"garbage!")
    with Wal(tmp_path) as w:
        assert w.recovery.cursor_reset is True
        assert w.cursor == 0  # everything is sent again; the Mixer deduplicates by id
        assert len(w.read_from(w.cursor + 1, 100)) == 10


def test_acked_segments_are_deleted_at_open_without_scanning(tmp_path):
    fill(tmp_path, 2000, size=100, segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".seg"))
    assert len(files) >= 4
    third = int(files[2][4:20], 16)
    saved = {f: (tmp_path / f).read_bytes() for f in files[:2]}
    with Wal(tmp_path, segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None) as w:
        w.ack_many(range(1, third))
        w.persist_cursor()
        assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".seg")) == files[2:]
    for f, data in saved.items():  # a crash between the cursor rename and the unlinks
        (tmp_path / f).write_bytes(b"\xff" * len(data))  # (contents irrelevant: not even read)
    with Wal(tmp_path) as w:
        assert w.recovery.segments_deleted == 2
        assert w.recovery.corrupt_records_skipped == 0
        assert w.read_from(0, 1)[0].seq == third


def test_seq_skips_past_a_damaged_tail(tmp_path):
    fill(tmp_path, 10)
    seg = tmp_path / segment_name(1)
    data = seg.read_bytes()
    seg.write_bytes(data[:-3] + b"\xff\xff\xff")  # last record damaged: its seq is unknown
    with Wal(tmp_path) as w:
        assert w.recovery.records_ok == 9
        # records that might have been shipped under seq 10 can never collide with new ones
        assert w.recovery.next_seq > 10


def test_record_rotting_after_open_does_not_block_the_cursor(tmp_path):
    fill(tmp_path, 10)
    with Wal(tmp_path) as w:
        off = w._segments[0].offsets[4]  # seq 5
        with open(tmp_path / segment_name(1), "r+b") as fh:
            fh.seek(off + 12)
            fh.write(b"\xee\xee")
        recs = w.read_from(1, 100)
        assert [r.seq for r in recs] == [1, 2, 3, 4, 6, 7, 8, 9, 10]
        assert w.metrics()["read_lost_records"] == 1
        for r in recs:
            w.ack(r.seq)
        assert w.cursor == 10


def test_readonly_open_repairs_nothing(tmp_path):
    fill(tmp_path, 5)
    seg = tmp_path / segment_name(1)
    with open(seg, "ab") as fh:
        fh.write(b"\x00\x00\x01\x00partial")
    before = seg.read_bytes()
    with Wal(tmp_path, readonly=True) as ro:
        assert ro.recovery.torn_bytes_truncated == 11 and ro.recovery.readonly
    assert seg.read_bytes() == before
    assert not (tmp_path / CURSOR_FILE).exists()


def test_foreign_files_are_left_alone(tmp_path):
    fill(tmp_path, 3)
    (tmp_path / "notes.txt").write_text("operator was here")
    (tmp_path / "wal-xyz.seg").write_text("not ours")
    with Wal(tmp_path) as w:
        assert w.recovery.records_ok == 3
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "wal-xyz.seg").exists()
