"""fluxrig.net.serial_ingress (sans-IO): framer + resynchronisation, over both framer backends,
fed whole, one byte at a time and with trailing bytes."""

import pytest

from fluxrig import framing
from fluxrig.framing import make_framer
from fluxrig.net.serial_ingress import Fault, Ingress

CT = 10 / 9600  # one character at 9600 8N1

BACKENDS = ["py"] + (["c"] if framing.BACKEND == "cython" else [])


def ingress(backend, **cfg):
    return Ingress(make_framer(cfg, pure=backend == "py"), cfg, CT)


def run(ing, chunks, t0=0.0, step=0.0):
    out = []
    now = t0
    for c in chunks:
        out += ing.feed(c, now)
        now += step
    return out


def split(items):
    frames = [i for i in items if isinstance(i, bytes)]
    faults = [i for i in items if isinstance(i, Fault)]
    return frames, faults


def chunkings(stream: bytes):
    yield [stream]
    yield [bytes([b]) for b in stream]
    yield [stream[:7], stream[7:]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_delimiter_suffix_oversize_resumes_after_its_delimiter(backend):
    stream = b"a\r\n" + b"x" * 40 + b"\r\nb\r\n" + b"y" * 30 + b"\r\nc\r\n"
    for chunks in chunkings(stream):
        ing = ingress(backend, framing="delimiter", delimiter="\\r\\n", max_frame_bytes=8)
        frames, faults = split(run(ing, chunks))
        assert frames == [b"a", b"b", b"c"], chunks[:2]
        assert [f.reason for f in faults] == ["frame_too_large"] * 2 and all(f.fatal for f in faults)
        assert ing.discarded > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_delimiter_prefix_oversize_resumes_at_the_next_delimiter(backend):
    stream = b"$ok1" + b"$" + b"z" * 30 + b"$ok2$ok3"
    for chunks in chunkings(stream):
        ing = ingress(backend, framing="delimiter", delimiter="$", delimiter_position="prefix", max_frame_bytes=8)
        items = run(ing, chunks) + ing.close()
        frames, faults = split(items)
        assert frames == [b"ok1", b"ok2", b"ok3"], chunks[:2]
        assert [f.reason for f in faults] == ["frame_too_large"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_slip_bad_escape_is_recoverable_and_oversize_resyncs_at_end(backend):
    stream = b"\xc0one\xc0bad\xdb\x01\xc0two\xc0" + b"L" * 40 + b"\xc0three\xc0"
    for chunks in chunkings(stream):
        ing = ingress(backend, framing="slip", max_frame_bytes=10)
        frames, faults = split(run(ing, chunks))
        assert frames == [b"one", b"two", b"three"]
        assert [f.reason for f in faults] == ["bad_frame", "frame_too_large"]
        assert faults[0].sample == b"bad\xdb\x01" and not faults[0].fatal


@pytest.mark.parametrize("backend", BACKENDS)
def test_length_prefix_resyncs_only_after_silence(backend):
    ing = ingress(backend, framing="length_prefix", max_frame_bytes=16)
    assert ing.resync_gap == pytest.approx(20 * CT)  # 20 characters (20.8 ms at 9600), at least 20 ms
    frames, faults = split(ing.feed(b"\x00\x02ok\x01\x00" + b"q" * 10, 0.0))
    assert frames == [b"ok"] and faults[0].reason == "frame_too_large" and faults[0].fields["error.size"] == "256"
    assert ing.feed(b"\x00\x02no", 0.010) == []  # no silence yet: still discarded
    frames, faults = split(ing.feed(b"\x00\x03yes", 0.011 + ing.resync_gap))
    assert frames == [b"yes"] and not faults


def test_modbus_crc_in_poll_and_truncated_frame_on_close():
    ing = Ingress(make_framer({"framing": "modbus_rtu", "idle_gap_ms": 5}), {"framing": "modbus_rtu"}, CT)
    good = bytes.fromhex("01030000000AC5CD")
    assert ing.feed(good, 0.0) == []
    assert ing.deadline() == pytest.approx(0.005)
    assert ing.poll(0.006) == [good[:-2]]
    ing.feed(good[:-1] + b"\x00", 1.0)
    (fault,) = ing.poll(1.01)
    assert fault.reason == "crc_mismatch" and fault.fields["error.crc_expected"] == "CDC5"
    ing.feed(b"\x01\x03\x00", 2.0)
    (fault,) = ing.close()  # the port closed mid-frame: flushed, too short to be a frame
    assert fault.reason == "bad_frame"
    ing2 = ingress("py", framing="length_prefix")
    ing2.feed(b"\x00\x09part", 0.0)
    (fault,) = ing2.close()
    assert fault.reason == "truncated_frame" and fault.fields["error.size"] == "6"


def test_idle_gap_oversize_waits_for_a_real_gap():
    cfg = {"framing": "idle_gap", "idle_gap_ms": 10, "max_frame_bytes": 4}
    ing = Ingress(make_framer(cfg), cfg, CT)
    frames, faults = split(ing.feed(b"toolong", 0.0))
    assert faults[0].reason == "frame_too_large" and frames == []
    assert ing.feed(b"more", 0.005) == []  # the same burst: discarded
    assert ing.feed(b"ok", 0.020) == []
    assert ing.poll(0.031) == [b"ok"]
