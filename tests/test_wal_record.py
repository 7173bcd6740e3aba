"""WAL record format (fluxrig.wal.record): golden bytes, scans whole / byte at a time / with
trailing bytes, torn tails at every cut, damage and resynchronisation, hypothesis on arbitrary
bytes (never raises, chunking-invariant, events tile the input)."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxrig.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from fluxrig.wal.record import (
    DEFAULT_MAX_RECORD_BYTES,
    MAX_RECORD_BYTES_CEILING,
    REASON_BAD_CRC,
    REASON_BAD_LENGTH,
    REASON_OVERRUN,
    SEGMENT_HEADER_BYTES,
    Corrupt,
    Record,
    RecordReader,
    RecordSizeError,
    SegmentHeaderError,
    TornTail,
    WalError,
    encode_record,
    encode_segment_header,
    parse_segment_header,
    scan,
)

# -- golden bytes ---------------------------------------------------------------------------


def test_golden_record_bytes():
    # length 1 | crc32c(b"\xa0") | CBOR empty map
    assert encode_record(b"\xa0") == bytes.fromhex("00000001f036e6f7a0")
    # an object is CBOR-encoded first: {"a": 1} -> a1 61 61 01
    assert encode_record({"a": 1}) == bytes.fromhex("00000004f292eb0aa1616101")


def test_golden_segment_header():
    h = encode_segment_header(1, bytes(range(16)))
    assert h == bytes.fromhex(
        "464c555857414c00"  # b"FLUXWAL\0"
        "0001"
        "0000"  # version 1, flags 0
        "0000000000000001"  # base seq
        "000102030405060708090a0b0c0d0e0f"  # wal_id
        "555b14e7"  # crc32c of the 36 bytes before
    )
    assert len(h) == SEGMENT_HEADER_BYTES
    parsed = parse_segment_header(h)
    assert (parsed.version, parsed.flags, parsed.base_seq, parsed.wal_id) == (1, 0, 1, bytes(range(16)))


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda h: h[:20], "only 20"),
        (lambda h: b"X" + h[1:], "magic"),
        (lambda h: h[:30] + bytes([h[30] ^ 1]) + h[31:], "CRC"),
    ],
)
def test_segment_header_errors(mutate, reason):
    with pytest.raises(SegmentHeaderError, match=reason) as info:
        parse_segment_header(mutate(encode_segment_header(7, os.urandom(16))), "wal-x.seg")
    assert isinstance(info.value, WalError) and isinstance(info.value, RemoteProtocolError)


def test_encode_limits():
    with pytest.raises(RecordSizeError) as info:
        encode_record(b"")
    assert info.value.limit == DEFAULT_MAX_RECORD_BYTES and info.value.size == 0
    with pytest.raises(RecordSizeError) as info:
        encode_record(b"x" * 101, max_record_bytes=100)
    assert (info.value.size, info.value.limit) == (101, 100)
    assert isinstance(info.value, LocalProtocolError) and isinstance(info.value, WalError)
    assert len(encode_record(b"x" * 100, max_record_bytes=100)) == 108


@pytest.mark.parametrize("bad", [0, -1, MAX_RECORD_BYTES_CEILING + 1, 1.5])
def test_max_record_bytes_is_bounded(bad):
    with pytest.raises(ConfigError) as info:
        RecordReader(max_record_bytes=bad)
    assert info.value.key == "max_record_bytes"


# -- helpers --------------------------------------------------------------------------------


def records(n, seed=1, max_len=300):
    rnd = random.Random(seed)
    return [encode_record(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, max_len)))) for _ in range(n)]


def run(data, chunks=None, base=0, **kw):
    r = RecordReader(base, **kw)
    out = []
    if chunks is None:
        out += r.feed(data)
    else:
        for i in range(0, len(data), chunks):
            out += r.feed(data[i : i + chunks])
    out += r.end()
    return out


def three_ways(data, **kw):
    """Whole, byte at a time, and in odd chunks: identical events."""
    whole = run(data, **kw)
    assert run(data, chunks=1, **kw) == whole
    assert run(data, chunks=7, **kw) == whole
    assert (
        list(scan(data, kw.get("base", 0), max_record_bytes=kw.get("max_record_bytes", DEFAULT_MAX_RECORD_BYTES)))
        == whole
    )
    return whole


def tiles(events, start, end):
    """Records, damage and torn tails cover [start, end) exactly, in order."""
    pos = start
    for ev in events:
        assert ev.offset == pos, (ev, pos)
        pos += 8 + len(ev.payload) if type(ev) is Record else ev.length
    assert pos == end


# -- scans ----------------------------------------------------------------------------------


def test_clean_stream_three_ways():
    recs = records(40)
    data = b"".join(recs)
    evs = three_ways(data, base=SEGMENT_HEADER_BYTES)
    assert [type(e) for e in evs] == [Record] * 40
    assert [e.payload for e in evs] == [r[8:] for r in recs]
    assert evs[0].offset == SEGMENT_HEADER_BYTES
    tiles(evs, SEGMENT_HEADER_BYTES, SEGMENT_HEADER_BYTES + len(data))


def test_partial_record_waits_until_more_bytes():
    rec = encode_record(b"\x82\x01\x40")
    r = RecordReader()
    assert r.feed(rec[:-1]) == []
    assert r.offset == 0 and r.buffered_bytes == len(rec) - 1
    assert r.feed(rec[-1:]) == [Record(0, b"\x82\x01\x40")]
    assert r.end() == []


def test_trailing_bytes_not_final_are_held():
    recs = records(3)
    data = b"".join(recs) + recs[0][:5]
    evs = list(scan(data, final=False))
    assert [type(e) for e in evs] == [Record] * 3


@pytest.mark.parametrize("extra", [b"\x00", b"\x00\x00\x00\x05\xaa", bytes(7)])
def test_trailing_bytes_final_are_torn(extra):
    recs = records(3)
    body = b"".join(recs)
    evs = three_ways(body + extra)
    assert evs[-1] == TornTail(len(body), len(extra))
    tiles(evs, 0, len(body) + len(extra))


def test_torn_tail_at_every_byte_of_the_last_record():
    recs = records(5, seed=3, max_len=40)
    head = b"".join(recs[:-1])
    last = recs[-1]
    for cut in range(1, len(last)):
        data = head + last[:cut]
        evs = three_ways(data)
        assert [type(e) for e in evs] == [Record] * 4 + [TornTail], cut
        assert evs[-1] == TornTail(len(head), cut)
    assert [type(e) for e in three_ways(head + last)] == [Record] * 5


def test_zero_filled_tail_is_torn():
    data = b"".join(records(4))
    evs = three_ways(data + bytes(5000))
    assert evs[-1] == TornTail(len(data), 5000)


def test_bad_crc_in_the_middle_is_skipped_and_counted():
    recs = records(10, seed=5)
    bad = bytearray(recs[4])
    bad[-1] ^= 0x40
    data = b"".join(recs[:4]) + bytes(bad) + b"".join(recs[5:])
    evs = three_ways(data)
    corrupt = [e for e in evs if type(e) is Corrupt]
    assert corrupt == [Corrupt(len(b"".join(recs[:4])), len(bad), REASON_BAD_CRC)]
    assert [e.payload for e in evs if type(e) is Record] == [r[8:] for r in recs[:4] + recs[5:]]
    tiles(evs, 0, len(data))


def test_absurd_length_resyncs():
    recs = records(6, seed=6)
    data = b"".join(recs[:2]) + b"\xff\xff\xff\xff\x00\x00\x00\x00" + b"".join(recs[2:])
    evs = three_ways(data)
    assert [e for e in evs if type(e) is Corrupt] == [Corrupt(len(b"".join(recs[:2])), 8, REASON_BAD_LENGTH)]
    assert sum(type(e) is Record for e in evs) == 6


def test_length_past_the_end_with_records_after_is_overrun():
    recs = records(4, seed=7)
    bogus = b"\x00\x01\x00\x00" + b"\x00\x00\x00\x00"  # claims 64 KiB, only ~1 KiB follows
    data = recs[0] + bogus + b"".join(recs[1:])
    evs = run(data)
    assert [e for e in evs if type(e) is Corrupt] == [Corrupt(len(recs[0]), len(bogus), REASON_OVERRUN)]
    assert sum(type(e) is Record for e in evs) == 4


def test_damaged_tail_with_nothing_after_is_corrupt():
    recs = records(4, seed=8)
    bad = bytearray(recs[-1])
    bad[9] ^= 1
    data = b"".join(recs[:-1]) + bytes(bad)
    evs = three_ways(data)
    assert evs[-1] == Corrupt(len(data) - len(bad), len(bad), REASON_BAD_CRC)


def test_small_max_record_bytes_is_enforced_when_reading():
    rec = encode_record(b"x" * 200)
    evs = run(rec + encode_record(b"y"), max_record_bytes=100)
    assert [type(e) for e in evs] == [Corrupt, Record]
    assert evs[1].payload == b"y"


def test_prefix_table_and_direct_checks_agree():
    rnd = random.Random(11)
    recs = [encode_record(os.urandom(rnd.randint(1, 5000))) for _ in range(12)]
    data = bytearray(b"".join(recs))
    for _ in range(6):
        at = rnd.randrange(len(data) - 100)
        data[at : at + 60] = os.urandom(60)
    data = bytes(data)
    assert run(data, direct_check_bytes=0) == run(data, direct_check_bytes=1 << 20) == run(data, chunks=333)


def test_random_garbage_is_linear_and_bounded():
    """A megabyte of garbage between records: everything after it is found again, and the
    reader never buffers more than max_record_bytes + a chunk."""
    recs = records(20, seed=12)
    data = b"".join(recs[:10]) + os.urandom(1 << 20) + b"".join(recs[10:])
    r = RecordReader(max_record_bytes=64 * 1024)
    evs = []
    peak = 0
    for i in range(0, len(data), 4096):
        evs += r.feed(data[i : i + 4096])
        peak = max(peak, r.buffered_bytes)
    evs += r.end()
    assert sum(type(e) is Record for e in evs) >= 20
    assert [e.payload for e in evs if type(e) is Record][-10:] == [x[8:] for x in recs[10:]]
    assert peak <= 64 * 1024 + 8 + 4096 + 64 * 1024  # candidate window + chunk + compaction slack


def test_end_is_idempotent_and_feed_after_end_raises():
    r = RecordReader()
    r.feed(b"\x00")
    assert r.end() == [TornTail(0, 1)]
    assert r.end() == []
    with pytest.raises(RuntimeError):
        r.feed(b"x")


def test_stats():
    recs = records(3)
    r = RecordReader()
    r.feed(b"".join(recs) + b"\x00\x00")
    r.end()
    assert r.stats == {"records": 3, "corrupt_ranges": 0, "corrupt_bytes": 0, "torn_bytes": 2}


# -- hypothesis -----------------------------------------------------------------------------

payloads = st.binary(min_size=1, max_size=64)
pieces = st.lists(
    st.one_of(payloads.map(lambda p: ("rec", p)), st.binary(max_size=40).map(lambda g: ("junk", g))), max_size=12
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.integers(1, 50), st.integers(0, 300))
def test_arbitrary_bytes_never_raise_and_tile(data, chunk, max_record):
    kw = {"max_record_bytes": max_record or 1}
    whole = run(data, **kw)
    assert run(data, chunks=chunk, **kw) == whole
    assert run(data, direct_check_bytes=0, **kw) == whole
    tiles(whole, 0, len(data))


@settings(max_examples=300, deadline=None)
@given(pieces, st.integers(1, 17))
def test_records_between_junk_are_found(parts, chunk):
    data = b""
    expected = []
    for kind, value in parts:
        if kind == "rec":
            expected.append(value)
            data += encode_record(value)
        else:
            data += value
    evs = run(data, chunks=chunk)
    tiles(evs, 0, len(data))
    got = [e.payload for e in evs if type(e) is Record]
    # Junk may itself decode as a record only with a matching CRC-32C (2**-32), and never
    # hides a real one: every appended payload comes back, in order.
    it = iter(got)
    assert all(any(p == g for g in it) for p in expected)
