"""WAL file layer (fluxrig.wal.log): appends and reads, fsync policies, rotation, cursor
semantics, deletion only when fully acknowledged, the size cap, locking and failure. Real
files in a temporary directory; recovery from damage is in test_wal_recovery.py."""

from __future__ import annotations

import os
import time

import cbor2
import pytest

from fluxrig.config import load_config
from fluxrig.errors import ConfigError
from fluxrig.wal import (
    Wal,
    WalClosed,
    WalFailed,
    WalFull,
    WalLocked,
    WalReadOnly,
    WalRecord,
    options_from_config,
)
from fluxrig.wal.layout import CURSOR_FILE, segment_name
from fluxrig.wal.log import MIN_SEGMENT_BYTES


def seg_files(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".seg"))


def body(i: int, size: int = 200) -> bytes:
    return cbor2.dumps({"i": i, "pad": b"x" * size})


def test_append_read_round_trip(tmp_path):
    with Wal(tmp_path, fsync="always") as w:
        assert w.append({"a": 1}) == 1
        assert w.append(b"\x01raw") == 2  # bytes are stored verbatim
        assert w.append(bytearray(b"")) == 3  # an empty body is allowed
        recs = w.read_from(1, 10)
    assert recs == [WalRecord(1, cbor2.dumps({"a": 1})), WalRecord(2, b"\x01raw"), WalRecord(3, b"")]
    assert recs[0].decode() == {"a": 1}


def test_seqs_and_wal_id_survive_reopen(tmp_path):
    with Wal(tmp_path, fsync="never") as w:
        for i in range(5):
            w.append(body(i))
        wid = w.wal_id_hex
    with Wal(tmp_path) as w:
        assert w.wal_id_hex == wid and len(wid) == 32
        assert w.recovery.records_ok == 5 and w.recovery.next_seq == 6
        assert w.append(body(5)) == 6
        w.commit()
        assert [r.seq for r in w.read_from(0, 100)] == [1, 2, 3, 4, 5, 6]


def test_policy_always_fsyncs_before_returning(tmp_path):
    with Wal(tmp_path, fsync="always") as w:
        for i in range(5):
            seq = w.append(body(i))
            assert w.committed_seq == seq
        assert w.metrics()["fsyncs"] == 5


def test_policy_never_writes_without_fsync(tmp_path):
    with Wal(tmp_path, fsync="never") as w:
        seq = w.append(body(0))
        assert w.committed_seq == seq
        assert w.metrics()["fsyncs"] == 0
        # written to the OS: another reader sees it at once
        assert os.path.getsize(tmp_path / segment_name(1)) > 40


def test_policy_batch_commits_per_window(tmp_path):
    with Wal(tmp_path, fsync="batch", batch_window_ms=100) as w:
        a = w.append(body(0))
        assert w.committed_seq < a  # waiting for the window
        assert w.read_from(1, 10) == []  # not acknowledged: not visible to the shipper
        w.first_staged_at -= 0.2  # the window has passed
        b = w.append(body(1))
        assert w.committed_seq == b
        assert w.metrics()["fsyncs"] == 1
        c = w.append(body(2))
        assert w.commit() == c


def test_rotation_by_size_and_segment_bases(tmp_path):
    with Wal(tmp_path, fsync="never", segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None) as w:
        for i in range(1000):
            w.stage(body(i))
        w.commit()
        files = seg_files(tmp_path)
        assert len(files) >= 3
        for name in files:
            assert os.path.getsize(tmp_path / name) <= MIN_SEGMENT_BYTES
        # each segment is named after the seq of its first record
        bases = [int(n[4:20], 16) for n in files]
        for base in bases:
            assert w.read_from(base, 1)[0].seq == base
        recs = w.read_from(1, 5000, max_bytes=1 << 30)
        assert [r.seq for r in recs] == list(range(1, 1001))
        assert [cbor2.loads(r.payload)["i"] for r in recs] == list(range(1000))


def test_read_from_limits(tmp_path):
    with Wal(tmp_path, fsync="never", segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None) as w:
        for i in range(600):
            w.stage(body(i))
        w.commit()
        assert [r.seq for r in w.read_from(100, 7)] == list(range(100, 107))
        small = w.read_from(1, 1000, max_bytes=1000)  # ~250 bytes per record
        assert 1 <= len(small) <= 4 and small[0].seq == 1
        assert [r.seq for r in w.read_from(1, 1, max_bytes=1)] == [1]  # always at least one
        assert w.read_from(601, 10) == [] and w.read_from(1, 0) == []


def test_cursor_is_highest_contiguous_ack(tmp_path):
    with Wal(tmp_path, fsync="never") as w:
        for i in range(10):
            w.append(body(i))
        assert w.ack(3) == 0
        assert w.ack(2) == 0
        assert w.ack(1) == 3
        assert w.ack(5) == 3
        assert w.ack(4) == 5
        assert w.metrics()["unacked_records"] == 5
        before = w.metrics()["acks_ignored"]
        w.ack(2)  # at or below the cursor
        w.ack(11)  # not committed
        w.ack(10**9)
        assert w.metrics()["acks_ignored"] == before + 3
        assert w.cursor == 5


def test_cursor_persisted_atomically_and_reloaded(tmp_path):
    with Wal(tmp_path, fsync="never") as w:
        for i in range(10):
            w.append(body(i))
        w.ack_many([1, 2, 3, 4, 6])
        assert w.persist_cursor() is True
        assert w.persist_cursor() is False  # unchanged
        assert not os.path.exists(tmp_path / (CURSOR_FILE + ".tmp"))
        w.ack(7)  # cursor still 4: 5 is missing; out-of-order acks are memory only
    with Wal(tmp_path) as w:
        assert w.cursor == 4 == w.recovery.cursor
        # what was not contiguous is sent again (deduplicated upstream by seq)
        assert [r.seq for r in w.read_from(w.cursor + 1, 100)] == [5, 6, 7, 8, 9, 10]


def test_segment_deleted_only_when_fully_acked(tmp_path):
    with Wal(tmp_path, fsync="never", segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None) as w:
        for i in range(700):
            w.stage(body(i))
        w.commit()
        files = seg_files(tmp_path)
        second_base = int(files[1][4:20], 16)
        last_of_first = second_base - 1
        for s in range(1, last_of_first):  # all but the last record of segment 1
            w.ack(s)
        w.persist_cursor()
        assert seg_files(tmp_path) == files
        w.ack(last_of_first)
        w.persist_cursor()
        assert seg_files(tmp_path) == files[1:]
        assert w.metrics()["deleted_segments"] == 1
        # acking everything never deletes the active (last) segment
        for s in range(second_base, 701):
            w.ack(s)
        w.persist_cursor()
        assert seg_files(tmp_path) == files[-1:]
        assert w.cursor == 700


def test_size_cap_drops_oldest_and_counts(tmp_path):
    cap = 4 * MIN_SEGMENT_BYTES
    with Wal(tmp_path, fsync="never", max_size_bytes=cap) as w:
        assert w.segment_max_bytes == MIN_SEGMENT_BYTES  # clamped to a quarter of the cap
        n = 0
        for _ in range(30):
            for _ in range(100):
                n += 1
                w.stage(body(n))
            w.commit()
            assert w.metrics()["size_bytes"] <= cap + 100 * 300
        m = w.metrics()
        remaining = w.read_from(0, 10**6, max_bytes=1 << 30)
        assert m["dropped_records"] == n - len(remaining) > 0
        assert m["dropped_segments"] >= 1
        assert sum(os.path.getsize(tmp_path / f) for f in seg_files(tmp_path)) == m["size_bytes"]
        # the newest records are the ones kept, and they are intact
        assert remaining[-1].seq == n and cbor2.loads(remaining[-1].payload)["i"] == n
        # the cursor skips over what was dropped once the survivors are acked
        for r in remaining:
            w.ack(r.seq)
        assert w.cursor == n


def test_size_cap_does_not_count_acked_records(tmp_path):
    cap = 4 * MIN_SEGMENT_BYTES
    with Wal(tmp_path, fsync="never", max_size_bytes=cap) as w:
        for i in range(2000):
            seq = w.append(body(i))
            w.ack(seq)  # acknowledged but the cursor is not persisted: segments stay
        assert w.metrics()["dropped_records"] == 0


def test_second_writer_is_locked_out_readonly_is_not(tmp_path):
    with Wal(tmp_path, fsync="never") as w:
        w.append(body(0))
        with pytest.raises(WalLocked):
            Wal(tmp_path)
        ro = Wal(tmp_path, readonly=True)
        assert ro.recovery.records_ok == 1 and ro.recovery.readonly
        assert ro.read_from(1, 5)[0].seq == 1
        with pytest.raises(WalReadOnly):
            ro.append(body(1))
        with pytest.raises(WalReadOnly):
            ro.persist_cursor()
        ro.close()


def test_readonly_missing_directory(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        Wal(tmp_path / "nope", readonly=True)


def test_closed_wal_refuses_appends(tmp_path):
    w = Wal(tmp_path)
    w.stage(body(0))
    w.close()  # commits what was staged
    w.close()
    with pytest.raises(WalClosed):
        w.append(body(1))
    with Wal(tmp_path) as w2:
        assert w2.recovery.records_ok == 1


def test_pending_limit_raises_wal_full(tmp_path):
    with Wal(tmp_path, fsync="batch", max_pending_bytes=1000) as w:
        w.stage(body(0))
        w.stage(body(1))
        w.stage(body(2))
        with pytest.raises(WalFull) as info:
            for i in range(10):
                w.stage(body(i))
        assert info.value.limit == 1000
        assert w.metrics()["wal_full"] == 1
        w.commit()
        w.stage(body(99))  # room again


def test_io_error_fails_the_wal_until_reopened(tmp_path):
    w = Wal(tmp_path, fsync="always")
    w.append(body(0))
    os.close(w._fd)  # the disk goes away under it: a real EBADF from write()
    with pytest.raises(WalFailed) as info:
        w.append(body(1))
    assert info.value.op == "write"
    with pytest.raises(WalFailed):
        w.stage(body(2))
    assert w.metrics()["failed"] is True
    w._fd = None
    w.close()
    with Wal(tmp_path) as w2:
        assert w2.recovery.records_ok == 1
        assert w2.append(body(3)) >= 2


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"fsync": "sometimes"}, "store.wal_fsync"),
        ({"batch_window_ms": 0}, "store.wal_fsync_window"),
        ({"batch_window_ms": 150}, "store.wal_fsync_window"),
        ({"segment_max_bytes": 1000}, "segment_max_bytes"),
        ({"max_size_bytes": 1000}, "store.wal_max_size_mb"),
        ({"max_record_bytes": 0}, "max_record_bytes"),
    ],
)
def test_bad_options(tmp_path, kw, key):
    with pytest.raises(ConfigError) as info:
        Wal(tmp_path, **kw)
    assert info.value.key == key


def test_options_from_config():
    cfg = load_config(None, environ={"FLUXRIG_STORE_WAL_FSYNC": "always", "FLUXRIG_STORE_WAL_MAX_SIZE_MB": "64"})
    opts = options_from_config(cfg)
    assert opts == {"fsync": "always", "batch_window_ms": pytest.approx(50.0), "max_size_bytes": 64 * 1024 * 1024}


def test_metrics_shape(tmp_path):
    with Wal(tmp_path, fsync="batch") as w:
        w.append(body(0))
        m = w.metrics()
    for key in (
        "appended_records", "committed_seq", "cursor", "persisted_cursor", "pending_records", "segments",
        "size_bytes", "dropped_records", "fsyncs", "fsync_seconds", "unacked_records", "fsync_policy", "backend",
    ):  # fmt: skip
        assert key in m
    assert m["pending_records"] == 1 and m["fsync_policy"] == "batch"


def test_recovery_time_is_reported(tmp_path):
    t0 = time.monotonic()
    with Wal(tmp_path) as w:
        assert 0 <= w.recovery.seconds <= time.monotonic() - t0


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fluxrig.wal.layout import payload_seq, unwrap_payload, wrap_payload  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64 - 1), st.binary(max_size=300))
def test_log_payload_round_trip(seq, data):
    p = wrap_payload(seq, data)
    assert cbor2.loads(p) == [seq, data]  # really CBOR [seq, bytes]
    assert payload_seq(p) == seq and unwrap_payload(p) == (seq, data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_log_payload_parsers_only_raise_value_error(data):
    for parse in (payload_seq, unwrap_payload):
        try:
            parse(data)
        except ValueError:
            pass


def test_cursor_file_codec():
    from fluxrig.wal.layout import CURSOR_BYTES, decode_cursor, encode_cursor

    data = encode_cursor(12345)
    assert len(data) == CURSOR_BYTES == 20 and data[:8] == b"FLUXCUR\x00"
    assert decode_cursor(data) == 12345
    assert decode_cursor(data[:-1]) is None and decode_cursor(data + b"x") is None
    assert decode_cursor(data[:10] + bytes([data[10] ^ 1]) + data[11:]) is None
